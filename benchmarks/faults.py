"""Faults under load, and the soak: steady traffic at a fixed rate while the proxy is hurt on purpose.

    .venv/bin/python -m benchmarks.faults                      # faults: ~60 s, each fault once
    .venv/bin/python -m benchmarks.faults --soak               # soak: 5 minutes, a fault every 30 s

A fake Flagsmith API and `edge-proxy serve --workers 2` on 127.0.0.1. A paced client sends a mix of
requests (flags, identities with random users and traits, the environment document, analytics), each on
a fresh connection so a failure is exactly one request in flight. Faults, in turn: SIGKILL the leader,
SIGKILL a worker, upstream answering 500, upstream stalling, recovery. Reported: requests sent and failed
(failures within a second of a worker kill are that worker's in-flight requests, counted apart), p50/p99,
RSS of every process, size of the shared-memory area and number of hand-over files, before and after.
Results are appended to benchmarks/results/faults.md (or soak.md). Everything stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tests.fake_upstream import FakeFlagsmith
from tests.support import ProxyProcess, conformance_documents, proxy_config, wait_for

RESULTS = Path(__file__).parent / "results"
CLIENT = "env_client_key_1"
SERVER = "ser.env_server_key_1"


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    failures: list[tuple[float, str]] = field(default_factory=list)
    sent: int = 0


def _request(kind: str) -> bytes:
    if kind == "flags":
        head = f"GET /api/v1/flags/ HTTP/1.1\r\nHost: x\r\nX-Environment-Key: {CLIENT}\r\n"
        return (head + "Connection: close\r\n\r\n").encode()
    if kind == "document":
        return (
            f"GET /api/v1/environment-document/ HTTP/1.1\r\nHost: x\r\nX-Environment-Key: {SERVER}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
    if kind == "analytics":
        body = json.dumps({"show_banner": random.randint(1, 5), "banner_text": 1}).encode()
        path = "/api/v1/analytics/flags/"
    else:
        traits = [
            {"trait_key": "plan", "trait_value": random.choice(["free", "premium", "beta"])},
            {"trait_key": "age", "trait_value": random.randint(1, 99)},
            {"trait_key": "beta", "trait_value": random.choice([True, False])},
        ]
        body = json.dumps({"identifier": f"user-{random.getrandbits(40)}", "traits": traits}).encode()
        path = "/api/v1/identities/"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Environment-Key: {CLIENT}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


MIX = ["flags"] * 4 + ["identity"] * 4 + ["document", "analytics"]


async def one(port: int, tally: Tally) -> None:
    started = time.monotonic()
    tally.sent += 1
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_request(random.choice(MIX)))
            await writer.drain()
            data = await reader.read()
            writer.close()
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
        if status != 200:
            tally.failures.append((started, f"status {status}"))
            return
    except (OSError, TimeoutError, ValueError, IndexError) as exc:
        tally.failures.append((started, type(exc).__name__))
        return
    tally.latencies.append(time.monotonic() - started)


async def load(port: int, rate: float, until: float, tally: Tally) -> None:
    tasks: set[asyncio.Task[None]] = set()
    interval = 1 / rate
    next_at = time.monotonic()
    while time.monotonic() < until:
        task = asyncio.create_task(one(port, tally))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += interval
        await asyncio.sleep(max(0, next_at - time.monotonic()))
    await asyncio.gather(*tasks)


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def snapshot(proxy: ProxyProcess) -> dict[str, object]:
    leader = proxy.leader_pid()
    area = proxy.area
    files = sum(1 for folder in ("analytics", "usage") if (area / folder).is_dir() for _ in (area / folder).iterdir())
    # blocks really used (prometheus' multiprocess files are sparse: their length says 1 MiB)
    size = sum(p.stat().st_blocks * 512 for p in area.rglob("*") if p.is_file()) if area.is_dir() else 0
    return {
        "main": rss_kib(proxy.pid),
        "leader": rss_kib(leader) if leader else 0,
        "workers": [rss_kib(pid) for pid in proxy.worker_pids()],
        "area_bytes": size,
        "handover_files": files,
    }


def fault_plan(soak: bool, duration: float) -> list[tuple[float, str]]:
    faults = ["kill_leader", "kill_worker", "upstream_500", "upstream_stall"]
    if not soak:
        return [(8 + 12 * i, fault) for i, fault in enumerate(faults)]
    return [(30.0 * (i + 1), faults[i % len(faults)]) for i in range(int(duration // 30) - 1)]


async def hurt(
    proxy: ProxyProcess,
    upstream: FakeFlagsmith,
    plan: list[tuple[float, str]],
    t0: float,
    worker_kills: list[float],
    log: list[str],
) -> None:
    for at, fault in plan:
        await asyncio.sleep(max(0, t0 + at - time.monotonic()))
        now = time.monotonic()
        if fault == "kill_leader" and (leader := proxy.leader_pid()):
            os.kill(leader, signal.SIGKILL)
        elif fault == "kill_worker" and (workers := proxy.worker_pids()):
            worker_kills.append(now)
            os.kill(workers[0], signal.SIGKILL)
        elif fault == "upstream_500":
            upstream.fail = 500
            await asyncio.sleep(5)
            upstream.fail = None
        elif fault == "upstream_stall":
            upstream.stall.add(SERVER)
            await asyncio.sleep(5)
            upstream.stall.discard(SERVER)
        upstream.toggle(SERVER, "show_banner")  # a change to publish after each fault
        log.append(f"{now - t0:6.1f}s {fault}")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--soak", action="store_true", help="5 minutes, a fault every 30 s")
    parser.add_argument("--duration", type=float, help="seconds of load (default 60, soak 300)")
    parser.add_argument("--rate", type=float, default=200, help="requests per second")
    args = parser.parse_args()
    duration = args.duration or (300 if args.soak else 60)
    upstream = FakeFlagsmith(conformance_documents()).start()
    workdir = Path(tempfile.mkdtemp(prefix="edge-proxy-faults-"))
    config = proxy_config(
        upstream.api_url,
        api_poll_frequency_seconds=1,
        api_poll_timeout_seconds=1,
        api_fetch_deadline_seconds=2,
        analytics_flush_interval_seconds=2,
        health_check={"environment_update_grace_period_seconds": 30},
    )
    proxy = ProxyProcess(workdir, config, workers=2).start()
    try:
        proxy.wait_ready()
        tally, worker_kills, log = Tally(), [], []
        warm = Tally()
        asyncio.run(load(proxy.port, args.rate, time.monotonic() + 10, warm))  # warm-up, not counted
        before = snapshot(proxy)
        t0 = time.monotonic()

        async def run() -> None:
            await asyncio.gather(
                load(proxy.port, args.rate, t0 + duration, tally),
                hurt(proxy, upstream, fault_plan(args.soak, duration), t0, worker_kills, log),
            )

        asyncio.run(run())
        wait_for(lambda: len(proxy.worker_pids()) == 2, 10)
        time.sleep(3)  # hand-overs and flushes settle
        after = snapshot(proxy)
        ready = proxy.get("/proxy/health/readiness").status_code
    finally:
        proxy.stop()
        upstream.stop()
    # A killed worker's in-flight requests: those it held when killed (started up to the 5 s client timeout
    # before), and connections the kernel had already queued on its listening socket (SO_REUSEPORT hands
    # each worker its own accept queue) in the moment before Granian noticed: up to 1 s after.
    in_flight = [f for f in tally.failures if any(k - 5.5 <= f[0] <= k + 1.0 for k in worker_kills)]
    other = [f for f in tally.failures if f not in in_flight]
    growth = {
        "leader": after["leader"] / before["leader"] - 1 if before["leader"] else 0,
        "workers (sum)": sum(after["workers"]) / max(1, sum(before["workers"])) - 1,  # type: ignore[arg-type]
    }
    lines = [
        f"\n## {'soak' if args.soak else 'faults'} — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, commit "
        + subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        f"- command: `.venv/bin/python -m benchmarks.faults{' --soak' if args.soak else ''}"
        f" --duration {duration:g} --rate {args.rate:g}` (2 workers; fresh connection per request)",
        f"- faults: {'; '.join(line.strip() for line in log)}",
        f"- requests sent {tally.sent}, failed {len(tally.failures)}: {len(in_flight)} in flight on a killed worker, "
        f"{len(other)} otherwise {sorted({reason for _, reason in other})}",
        "- failures at (s after start, reason): "
        + (", ".join(f"{t - t0:.2f} {reason}" for t, reason in tally.failures[:20]) or "none")
        + "; worker kills at: "
        + (", ".join(f"{k - t0:.2f}" for k in worker_kills) or "none"),
        f"- latency p50 {percentile(tally.latencies, 50) * 1000:.1f} ms, "
        f"p99 {percentile(tally.latencies, 99) * 1000:.1f} ms",
        f"- RSS KiB before: {before}",
        f"- RSS KiB after:  {after}",
        "- RSS growth after warm-up: " + ", ".join(f"{k} {v * 100:+.1f} %" for k, v in growth.items()),
        f"- readiness at the end: {ready}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / ("soak.md" if args.soak else "faults.md"), "a") as results:
        results.write(text)
    return 0 if not other else 1


if __name__ == "__main__":
    raise SystemExit(main())
