"""Cost as the work grows: many environments, one proxy.

    .venv/bin/python -m benchmarks.scale --environments 1000 10000

For each count: a lean upstream on 127.0.0.1 serving that many copies of the conformance environment
(distinct keys, pre-encoded, If-Modified-Since honoured), and `edge-proxy serve --workers 1` polling them.
Measured: time from start to readiness, RSS of the worker and the leader (and per environment, beside the
document's size), the leader's CPU per poll round, and how long one changed environment takes to be served.
Results are appended to benchmarks/results/scale.md. Everything stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from benchmarks.documents import base_document
from tests.conftest import ProxyProcess, wait_for

RESULTS = Path(__file__).parent / "results"


class LeanUpstream:
    """Pre-encoded documents by server key; 304 when If-Modified-Since is not older."""

    def __init__(self, count: int) -> None:
        self.documents: dict[str, tuple[bytes, datetime]] = {}
        base = base_document()
        base["identity_overrides"] = []
        updated = datetime(2024, 5, 1, tzinfo=UTC)
        for i in range(count):
            base["api_key"] = f"client_{i}"
            self.documents[f"ser.server_{i}"] = (json.dumps(base).encode(), updated)
        self.base = base
        self.requests = 0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                upstream.requests += 1
                found = upstream.documents.get(self.headers.get("X-Environment-Key") or "")
                if found is None:
                    return self._send(401, b"{}", {})
                body, updated = found
                ims = self.headers.get("If-Modified-Since")
                if ims and updated.replace(microsecond=0) <= parsedate_to_datetime(ims):
                    return self._send(304, b"", {})
                return self._send(200, body, {"Last-Modified": format_datetime(updated, usegmt=True)})

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/v1"

    def change(self, index: int) -> None:
        document = dict(self.base, api_key=f"client_{index}")
        document["feature_states"] = [dict(s) for s in self.base["feature_states"]]
        document["feature_states"][0]["enabled"] = not document["feature_states"][0]["enabled"]
        updated = datetime.now(UTC) + timedelta(seconds=2)
        self.documents[f"ser.server_{index}"] = (json.dumps(document).encode(), updated)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def rss_kib(pid: int | None) -> int:
    if pid is None:
        return 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(count: int, poll: float) -> dict[str, Any]:
    upstream = LeanUpstream(count)
    pairs = [{"server_side_key": f"ser.server_{i}", "client_side_key": f"client_{i}"} for i in range(count)]
    config = {
        "environment_key_pairs": pairs,
        "api_url": upstream.api_url,
        "api_poll_frequency_seconds": poll,
        "api_poll_timeout_seconds": 10,
        "health_check": {"environment_update_grace_period_seconds": 600},
        "logging": {"log_level": "WARNING"},
    }
    proxy = ProxyProcess(Path(tempfile.mkdtemp(prefix="edge-proxy-scale-")), config, workers=1)
    started = time.monotonic()
    proxy.start()
    try:
        proxy.wait_ready(timeout=1200)
        ready_after = time.monotonic() - started
        time.sleep(2)
        worker, leader = proxy.worker_pids()[0], proxy.leader_pid()
        assert leader is not None
        rss_worker, rss_leader = rss_kib(worker), rss_kib(leader)
        # the leader's CPU over whole poll rounds (all 304s)
        requests, cpu = upstream.requests, cpu_seconds(leader)
        rounds = 2
        time.sleep(poll * rounds)
        leader_cpu_per_round = (cpu_seconds(leader) - cpu) / rounds
        fetched = upstream.requests - requests
        # one change, seen by a client
        target = count // 2
        key = {"X-Environment-Key": f"client_{target}"}
        before = httpx.get(proxy.url + "/api/v1/flags/?feature=show_banner", headers=key).json()["enabled"]
        upstream.change(target)
        changed_at = time.monotonic()
        seen = wait_for(
            lambda: (
                httpx.get(proxy.url + "/api/v1/flags/?feature=show_banner", headers=key).json()["enabled"] is not before
            ),
            poll * 2 + 30,
            0.02,
        )
        propagation = time.monotonic() - changed_at if seen else float("nan")
    finally:
        proxy.stop(timeout=120)
        upstream.stop()
    document_bytes = len(next(iter(upstream.documents.values()))[0])
    return {
        "environments": count,
        "document_bytes": document_bytes,
        "ready_s": ready_after,
        "worker_rss_mib": rss_worker / 1024,
        "leader_rss_mib": rss_leader / 1024,
        "worker_kib_per_env": rss_worker / count,
        "leader_cpu_per_round_s": leader_cpu_per_round,
        "fetches_per_round": fetched / rounds,
        "propagation_s": propagation,
        "poll_s": poll,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--environments", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--poll", type=float, default=30, help="poll interval (seconds) during the measurement")
    args = parser.parse_args()
    base = measure(1, min(args.poll, 5))  # the fixed cost, subtracted to give the cost per environment
    rows = [measure(count, args.poll) for count in args.environments]
    for row in rows:
        row["worker_kib_per_env"] = (
            (row["worker_rss_mib"] - base["worker_rss_mib"]) * 1024 / max(1, row["environments"] - 1)
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"\n## scale — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, commit {commit}; "
        f"command: `.venv/bin/python -m benchmarks.scale --environments {' '.join(map(str, args.environments))} "
        f"--poll {args.poll:g}`; 1 worker; each environment is the conformance document (identity overrides removed)",
        "",
        f"one environment alone: worker RSS {base['worker_rss_mib']:.0f} MiB, "
        f"leader RSS {base['leader_rss_mib']:.0f} MiB",
        "",
        "| environments | document | time to ready | worker RSS | per environment (above one) | leader RSS "
        "| leader CPU per round | fetches per round | one change served after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['environments']} | {r['document_bytes'] / 1024:.1f} KiB | {r['ready_s']:.1f} s "
            f"| {r['worker_rss_mib']:.0f} MiB | {r['worker_kib_per_env']:.0f} KiB | {r['leader_rss_mib']:.0f} MiB "
            f"| {r['leader_cpu_per_round_s']:.2f} s | {r['fetches_per_round']:.0f} "
            f"| {r['propagation_s']:.2f} s (poll {r['poll_s']:g} s) |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "scale.md", "a") as results:
        results.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
