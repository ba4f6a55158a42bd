"""The cost of idle real-time streams: ordinary requests/s with N open streams against none, the worker's
memory per stream, and how long one change takes to reach all N.

    .venv/bin/python -m benchmarks.streams [--streams 5000] [--duration 10] [--connections 64] [--rounds 3]

One worker, pinned to CPU 1 with its leader (wrk on CPU 0, as benchmarks/wrk_run.py does). The streams are
held by this script's own event loop (raw sockets, one task each), idle but for the proxy's keep-alives.
Appends a table to benchmarks/results/streams.md. The issue's figure is --streams 5000; a quick check that
the script works is --streams 50 --duration 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.wrk_run import CLIENT, proxies, run_wrk
from tests.support import conformance_documents, wait_for

HERE = Path(__file__).parent
STREAM_PATH = "/sse/environments/env_client_key_1/stream"


def rss_kib(pid: int) -> int:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def streams_connected(url: str) -> float:
    import httpx

    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("edge_proxy_streams_connected "):
            return float(line.split()[1])
    return 0.0


class Holder:
    """N idle streams on a background event loop; records when each receives its latest event."""

    def __init__(self, port: int, count: int, path: str = STREAM_PATH) -> None:
        self.port = port
        self.count = count
        self.path = path
        self.opened = 0
        self.event_times: dict[int, float] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Future[None]] = []

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._open_all(), self.loop).result(timeout=600)

    async def _open_all(self) -> None:
        for start in range(0, self.count, 200):  # in batches: the listen backlog is finite
            await asyncio.gather(*(self._open(n) for n in range(start, min(self.count, start + 200))))

    async def _open(self, n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        request = f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"stream {n}: {status!r}")
        self.writers.append(writer)
        self.opened += 1
        self.tasks.append(asyncio.ensure_future(self._drain(n, reader)))

    async def _drain(self, n: int, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            if b"data: " in line:
                self.event_times[n] = time.monotonic()

    def close(self) -> None:
        async def close_all() -> None:
            for writer in self.writers:
                writer.close()

        asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs without and with the streams")
    parser.add_argument("--output", default=str(HERE / "results" / "streams.md"))
    args = parser.parse_args()
    raise_fd_limit(args.streams * 2 + 1024)  # ours and, inherited, the proxy's
    tmp = Path("/tmp") / f"edge-proxy-streams-{time.monotonic_ns()}"
    url_path, extra = "/api/v1/flags/", ["-H", CLIENT]
    config = {"api_poll_frequency_seconds": 1, "realtime": {"max_streams_per_worker": max(10_000, args.streams)}}
    for upstream, proxy, _, pin in proxies(tmp, conformance_documents(), [1], **config):
        os.sched_setaffinity(0, {0})  # this script (and the streams' event loop) with wrk, off the worker's CPU
        worker = proxy.worker_pids()[0]
        run_wrk(proxy.url + url_path, extra, 2, args.connections, pin)  # warm-up
        without: list[dict[str, Any]] = []
        with_streams: list[dict[str, Any]] = []
        rss_before = rss_after = 0
        opened_in = first = last = float("nan")
        received = 0
        for round_number in range(args.rounds):
            without.append(run_wrk(proxy.url + url_path, extra, args.duration, args.connections, pin))
            if round_number == 0:
                rss_before = rss_kib(worker)
            holder = Holder(proxy.port, args.streams)
            opening = time.monotonic()
            holder.start()
            assert wait_for(lambda url=proxy.url: streams_connected(url) >= args.streams, 120, 0.5)
            if round_number == 0:
                opened_in = time.monotonic() - opening
                time.sleep(2)
                rss_after = rss_kib(worker)
            with_streams.append(run_wrk(proxy.url + url_path, extra, args.duration, args.connections, pin))
            if round_number == args.rounds - 1:  # one change, fanned out to every stream
                holder.event_times.clear()
                upstream.toggle("ser.env_server_key_1", "show_banner")
                toggled = time.monotonic()
                wait_for(lambda times=holder.event_times: len(times) >= args.streams, 30, 0.1)
                times = sorted(holder.event_times.values())
                received = len(times)
                if times:
                    first, last = times[0] - toggled, times[-1] - toggled
            holder.close()
            assert wait_for(lambda url=proxy.url: streams_connected(url) == 0, 60, 0.5)
        before = statistics.median([run["rps"] for run in without])
        during = statistics.median([run["rps"] for run in with_streams])
        per_stream = (rss_after - rss_before) / args.streams
        ratio = during / before
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        runs = " / ".join(f"{a['rps']:,.0f} vs {b['rps']:,.0f}" for a, b in zip(without, with_streams, strict=True))
        lines = [
            f"\n## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {args.streams} idle streams, commit {commit}",
            f"{platform.node()}, {platform.processor() or platform.machine()}, Python {platform.python_version()}; "
            f"`{' '.join(sys.argv)}`; wrk: `{without[0]['command']}`",
            "",
            "| measure | value |",
            "|---|---|",
            f"| requests/s, no streams (median of {args.rounds}) | {before:,.0f} |",
            f"| requests/s, {args.streams} streams open (median of {args.rounds}) | {during:,.0f} |",
            f"| ratio | {ratio:.3f} ({(ratio - 1) * 100:+.1f} %) |",
            f"| each round, without vs with | {runs} |",
            f"| p99 without / with (last round) | {without[-1]['p99']} / {with_streams[-1]['p99']} |",
            f"| worker RSS | {rss_before / 1024:.1f} MiB → {rss_after / 1024:.1f} MiB |",
            f"| memory per stream | {per_stream:.1f} KiB |",
            f"| time to open all | {opened_in:.1f} s |",
            f"| one change reached streams | first {first:.3f} s, last {last:.3f} s after the upstream toggle "
            f"(poll 1 s; {received}/{args.streams} received) |",
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        with open(args.output, "a") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
