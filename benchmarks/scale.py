"""Cost as the work grows: 1,000 and 10,000 environments on one node.

    .venv/bin/python -m benchmarks.scale --environments 1000 10000 --modes discovery static --workers 2 --poll 60

For each count and mode: a lean upstream on 127.0.0.1 serving that many small generated environments (about
7 KB: 10 features, 2 segments, one identity override; `benchmarks/documents.py` `small_environment`),
pre-encoded, with If-Modified-Since honoured and `/api/v1/proxy/config/` listing them for the proxy key; and
`edge-proxy serve` with 2 workers polling every 60 s, discovering the environments (mode `discovery`) or
given them as static pairs (mode `static`). Measured:

* time to ready: from start until every worker's readiness answers 200 (every environment loaded there);
* RSS (and its private part, RssAnon) of each process, and the largest worker's RSS above a one-environment
  worker's per byte of documents;
* CPU of the leader and of each worker at steady state (over one poll interval, after the first spread round),
  and the leader's CPU per fetch;
* one change's propagation: from the upstream serving the changed document (the leader fetched it at its
  next poll) until no worker answers with the old one (fresh connections every few ms; the last old answer);
* a cold environment's first identity answer (distinct environments, fresh connections).

Results are appended to benchmarks/results/scale.md. Everything stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any

from benchmarks.documents import small_environment
from tests.support import ProxyProcess, wait_for

RESULTS = Path(__file__).parent / "results"
PROXY_KEY = "pk.scale"


class LeanUpstream:
    """Pre-encoded documents by server key (304 when If-Modified-Since is not older), the proxy config.

    An asyncio server on its own thread, answering from prebuilt response bytes: Python's http.server
    answered about 150 documents a second, which bounded the proxy's start with 10,000 environments."""

    def __init__(self, count: int) -> None:
        updated = datetime(2024, 5, 1, tzinfo=UTC)
        self.documents: dict[str, tuple[bytes, datetime]] = {}
        self._responses: dict[bytes, tuple[bytes, str, datetime]] = {}  # key → (200 response, Last-Modified, date)
        for i in range(count):
            document = small_environment(i)
            document["updated_at"] = updated.isoformat()
            self._set(f"ser.server_{i}", json.dumps(document).encode(), updated)
        proxy_config = json.dumps(
            [
                {"client_side_key": f"client_{i}", "server_side_keys": [{"key": f"ser.server_{i}", "active": True}]}
                for i in range(count)
            ]
        ).encode()
        self._proxy_config = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(proxy_config) + proxy_config
        self.requests = 0
        self.watched: str | None = None  # a changed document's key: when it was first served, in `served_at`
        self.served_at: float | None = None
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait()

    def _set(self, key: str, body: bytes, updated: datetime) -> None:
        self.documents[key] = (body, updated)
        last_modified = format_datetime(updated, usegmt=True)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nLast-Modified: %s\r\n\r\n" % (
            len(body),
            last_modified.encode(),
        )
        self._responses[key.encode()] = (head + body, last_modified, updated)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        started.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(self._answer(head))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, head: bytes) -> bytes:
        self.requests += 1
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if lines[0].startswith(b"GET /api/v1/proxy/config"):
            return self._proxy_config if headers.get(b"x-proxy-key") == PROXY_KEY.encode() else UNAUTHORIZED
        found = self._responses.get(headers.get(b"x-environment-key", b""))
        if found is None:
            return UNAUTHORIZED
        response, last_modified, updated = found
        ims = headers.get(b"if-modified-since")
        if ims is not None and (ims.decode() == last_modified or updated <= parsedate_to_datetime(ims.decode())):
            return NOT_MODIFIED
        if self.served_at is None and headers.get(b"x-environment-key", b"").decode() == self.watched:
            self.served_at = time.monotonic()
        return response

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/api/v1"

    def total_bytes(self) -> int:
        return sum(len(body) for body, _ in self.documents.values())

    def change(self, index: int) -> None:
        key = f"ser.server_{index}"
        document = json.loads(self.documents[key][0])
        document["feature_states"][0]["enabled"] = not document["feature_states"][0]["enabled"]
        updated = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
        document["updated_at"] = updated.isoformat()
        self.loop.call_soon_threadsafe(self._replace, key, json.dumps(document).encode(), updated)

    def _replace(self, key: str, body: bytes, updated: datetime) -> None:
        """On the server's loop: the new document, watched from the first time it is served."""
        self._set(key, body, updated)
        self.watched, self.served_at = key, None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


UNAUTHORIZED = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}"
NOT_MODIFIED = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 0\r\n\r\n"


def status_field(pid: int, name: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, RssAnon, RssShmem), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request(port: int, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> Any:
    """One request on a fresh connection (the kernel hands it to any worker): (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    except (OSError, http.client.HTTPException):
        return None, {}, b""
    finally:
        connection.close()


def workers_ready(proxy: ProxyProcess, workers: int, timeout: float) -> bool:
    """Every worker answered readiness 200 (health names the answering worker with show_details)."""
    ready: set[str] = set()

    def check() -> bool:
        status, headers, _ = request(proxy.port, "GET", "/proxy/health/readiness", {})
        if status == 200:
            ready.add(headers.get("x-edge-proxy-worker", ""))
        return len(ready) >= workers

    return wait_for(check, timeout, 0.5)  # health reads every environment's status: not too often


def measure(count: int, mode: str, workers: int, poll: float, settle: float) -> dict[str, Any]:
    upstream = LeanUpstream(count)
    config: dict[str, Any] = {
        "api_url": upstream.api_url,
        "api_poll_frequency_seconds": poll,
        "api_poll_timeout_seconds": 10,
        "health_check": {"environment_update_grace_period_seconds": 600, "show_details": True},
        "logging": {"log_level": "WARNING"},
    }
    if mode == "discovery":
        config["proxy_key"] = PROXY_KEY
    else:
        config["environment_key_pairs"] = [
            {"server_side_key": f"ser.server_{i}", "client_side_key": f"client_{i}"} for i in range(count)
        ]
    proxy = ProxyProcess(Path(tempfile.mkdtemp(prefix="edge-proxy-scale-")), config, workers=workers)
    started = time.monotonic()
    proxy.start()
    row: dict[str, Any] = {"environments": count, "mode": mode, "document_bytes": upstream.total_bytes()}
    try:
        proxy.wait_live(120)
        if not workers_ready(proxy, workers, 1200):
            raise RuntimeError(f"not ready:\n{proxy.log()[-3000:]}")
        row["ready_s"] = time.monotonic() - started
        time.sleep(settle)  # past the first spread round: steady state
        leader, pids = proxy.leader_pid(), proxy.worker_pids()
        assert leader is not None
        processes = {"main": proxy.pid, "leader": leader, **{f"worker {n}": pid for n, pid in enumerate(pids, 1)}}
        row["rss_kib"] = {name: status_field(pid, "VmRSS") for name, pid in processes.items()}
        row["anon_kib"] = {name: status_field(pid, "RssAnon") for name, pid in processes.items()}
        cpu = {name: cpu_seconds(pid) for name, pid in processes.items()}
        requests_before, window_started = upstream.requests, time.monotonic()
        time.sleep(poll)  # one interval: every environment polled about once
        window = time.monotonic() - window_started
        row["cpu_share"] = {name: (cpu_seconds(pid) - cpu[name]) / window for name, pid in processes.items()}
        row["fetches_per_s"] = (upstream.requests - requests_before) / window
        row["propagation_s"] = propagation(proxy, upstream, count, poll)
        row["cold_identity_ms"] = cold_identities(proxy, count)
    finally:
        proxy.stop(timeout=120)
        upstream.stop()
    return row


def propagation(proxy: ProxyProcess, upstream: LeanUpstream, count: int, poll: float) -> float | None:
    """Seconds from the upstream serving a changed document (the leader fetched it, at its next poll) until no
    worker answers with the old one: answers on fresh connections (any worker) every few ms, timed; the last
    old answer after the fetch bounds when the last worker had the new one."""
    target = count // 2
    feature = json.loads(upstream.documents[f"ser.server_{target}"][0])["feature_states"][0]["feature"]["name"]
    path = f"/api/v1/flags/?feature={feature}"
    headers = {"X-Environment-Key": f"client_{target}"}
    before = json.loads(request(proxy.port, "GET", path, headers)[2])["enabled"]
    upstream.change(target)
    last_old = None
    new_in_a_row = 0
    deadline = time.monotonic() + poll * 1.5 + 10
    while time.monotonic() < deadline and new_in_a_row < 50:  # 50 new answers in a row: every worker has it
        status, _, body = request(proxy.port, "GET", path, headers)
        now = time.monotonic()
        if status != 200:
            continue
        if json.loads(body)["enabled"] == before:
            last_old, new_in_a_row = now, 0
        else:
            new_in_a_row += 1
        time.sleep(0.002)
    if new_in_a_row < 50 or upstream.served_at is None:
        return None
    return max(0.0, (last_old or upstream.served_at) - upstream.served_at)


def cold_identities(proxy: ProxyProcess, count: int, samples: int = 20) -> list[float]:
    """Milliseconds of the first identity request to environments nobody asked an identity of yet."""
    timings = []
    for n in range(samples):
        key = f"client_{(count // 3 + n * 7919) % count}"
        body = json.dumps({"identifier": f"cold-{n}", "traits": [{"trait_key": "plan", "trait_value": "x"}]})
        headers = {"X-Environment-Key": key, "Content-Type": "application/json"}
        started = time.perf_counter()
        status, _, _ = request(proxy.port, "POST", "/api/v1/identities/", headers, body.encode())
        timings.append((time.perf_counter() - started) * 1000)
        assert status == 200, status
    return timings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--environments", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--modes", nargs="+", default=["discovery", "static"], choices=["discovery", "static"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--poll", type=float, default=60, help="poll interval (seconds), also the CPU window")
    parser.add_argument("--settle", type=float, default=None, help="seconds after ready before measuring")
    parser.add_argument("--note", default="", help="a line added to the results (e.g. the machine's load)")
    args = parser.parse_args()
    settle = args.settle if args.settle is not None else args.poll * 1.5  # past the first spread round
    base = measure(1, "static", args.workers, min(args.poll, 10), 5)
    base_rss = max(v for k, v in base["rss_kib"].items() if k.startswith("worker"))
    rows = []
    for count in args.environments:
        for mode in args.modes:
            print(f"measuring {count} environments, {mode} ...", flush=True)
            rows.append(measure(count, mode, args.workers, args.poll, settle))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = (
        f".venv/bin/python -m benchmarks.scale --environments {' '.join(map(str, args.environments))} "
        f"--modes {' '.join(args.modes)} --workers {args.workers} --poll {args.poll:g}"
    )
    lines = [
        f"\n## scale — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, commit {commit}; "
        f"command: `{command}`; {args.workers} workers; environments of ~7 KB (`small_environment`)",
        *([f"note: {args.note}"] if args.note else []),
        "",
        f"one environment alone: largest worker RSS {base_rss / 1024:.0f} MiB",
        "",
        "| environments | how | documents | ready after | largest worker RSS (private) | above one env, per "
        "document byte | leader RSS | leader CPU | busiest worker CPU | leader CPU per fetch | a change on every "
        "worker after the fetch | cold identity (median / max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        workers = {k: v for k, v in r["rss_kib"].items() if k.startswith("worker")}
        largest = max(workers, key=workers.__getitem__)
        per_byte = (workers[largest] - base_rss) * 1024 / r["document_bytes"]
        busiest = max(v for k, v in r["cpu_share"].items() if k.startswith("worker"))
        fetches = r["fetches_per_s"] or 1
        cold = r["cold_identity_ms"]
        propagation = f"{r['propagation_s'] * 1000:.0f} ms" if r["propagation_s"] is not None else "not seen"
        lines.append(
            f"| {r['environments']:,} | {r['mode']} | {r['document_bytes'] / 2**20:.0f} MiB | {r['ready_s']:.1f} s "
            f"| {workers[largest] / 1024:.0f} MiB ({r['anon_kib'][largest] / 1024:.0f} MiB) | {per_byte:.2f}× "
            f"| {r['rss_kib']['leader'] / 1024:.0f} MiB | {r['cpu_share']['leader'] * 100:.1f} % "
            f"| {busiest * 100:.1f} % | {r['cpu_share']['leader'] / fetches * 1000:.2f} ms "
            f"| {propagation} | {statistics.median(cold):.0f} / {max(cold):.0f} ms |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "scale.md", "a") as results:
        results.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
