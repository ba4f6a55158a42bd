"""HTTP throughput and latency with wrk against real `edge-proxy serve` processes.

Starts the fake upstream (127.0.0.1) and a proxy, runs each scenario with wrk, and appends a markdown
table to benchmarks/results/wrk.md with the machine, Python version, commit and command lines.

    .venv/bin/python -m benchmarks.wrk_run [--duration 10] [--workers 1 2] [--scenarios flags ...]

With one worker the proxy is pinned to CPU 1 and wrk to CPU 0 (`taskset`), as in the peers' baseline.
The `swap` scenario measures GET /api/v1/flags/ latency while a ~1 MB document changes upstream every
second (each change is rebuilt by every worker), against the same run without changes.

`--table` runs the comparison with the server's own floor instead (benchmarks/wrk_table.py): the proxy
(default and heavy profile) beside the fixed-bytes floors (a raw ASGI callable, BlackSheep, Granian's RSGI),
interleaved, one pinned worker each, each scenario as a share of the raw-ASGI floor of the same method, and
appends it to benchmarks/results/ceiling.md (`--scenarios` picks rows):

    .venv/bin/python -m benchmarks.wrk_run --table [--duration 10] [--rounds 3] [--connections 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.documents import about_one_megabyte
from tests.fake_upstream import FakeFlagsmith
from tests.support import ProxyProcess, conformance_documents, proxy_config

HERE = Path(__file__).parent
CLIENT = "X-Environment-Key: env_client_key_1"
SERVER = "X-Environment-Key: ser.env_server_key_1"

SCENARIOS: dict[str, tuple[str, list[str]]] = {
    "flags": ("/api/v1/flags/", ["-H", CLIENT]),
    "flag_single": ("/api/v1/flags/?feature=banner_text", ["-H", CLIENT]),
    "flags_gzip": ("/api/v1/flags/", ["-H", CLIENT, "-H", "Accept-Encoding: gzip"]),
    "post_identity": ("/api/v1/identities/", ["-H", CLIENT, "-s", str(HERE / "wrk" / "post_identity.lua")]),
    "get_identity": ("/api/v1/identities/?identifier=x", ["-H", CLIENT]),
    "get_identity_random": ("/", ["-H", CLIENT, "-s", str(HERE / "wrk" / "get_identity_random.lua")]),
    "post_identity_random": (
        "/api/v1/identities/",
        ["-H", CLIENT, "-s", str(HERE / "wrk" / "post_identity_random.lua")],
    ),
    "environment_document": ("/api/v1/environment-document/", ["-H", SERVER]),
    # OpenFeature remote evaluation: the same evaluation and identity LRU as the identity routes above.
    "ofrep_flag": ("/ofrep/v1/evaluate/flags/max_items", ["-H", CLIENT, "-s", str(HERE / "wrk" / "ofrep_flag.lua")]),
    "ofrep_flag_random": (
        "/ofrep/v1/evaluate/flags/max_items",
        ["-H", CLIENT, "-s", str(HERE / "wrk" / "ofrep_flag_random.lua")],
    ),
    "ofrep_bulk": ("/ofrep/v1/evaluate/flags", ["-H", CLIENT, "-s", str(HERE / "wrk" / "ofrep_flag.lua")]),
}


def run_wrk(url: str, extra: list[str], duration: float, connections: int, pin: str | None) -> dict[str, Any]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", *extra, url]
    if pin is not None:
        command = ["taskset", "-c", pin, *command]
    output = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", output).group(1))
    latencies = dict(re.findall(r"^\s+(50|90|99)%\s+([0-9.]+\w+)", output, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    requests = re.search(r"(\d+) requests in", output)
    return {
        "rps": rps,
        "requests": int(requests.group(1)) if requests else 0,
        "p50": latencies.get("50"),
        "p99": latencies.get("99"),
        "non2xx": int(errors.group(1)) if errors else 0,
        "command": " ".join(command),
    }


def proxies(
    tmp: Path, documents: dict[str, Any], workers_list: list[int], **config: Any
) -> Iterator[tuple[FakeFlagsmith, ProxyProcess, int, str | None]]:
    """For each worker count: (upstream, a ready proxy, workers, the CPU to pin wrk to); each proxy is stopped
    before the next starts, and the upstream at the end (use in a `for` loop run to completion)."""
    upstream = FakeFlagsmith(documents).start()
    try:
        for workers in workers_list:
            proxy = ProxyProcess(
                tmp / f"w{workers}-{time.monotonic_ns()}", proxy_config(upstream.api_url, **config), workers
            )
            proxy.start()
            try:
                proxy.wait_ready()
                if workers == 1:  # the proxy's processes on CPU 1, wrk on CPU 0
                    for pid in [proxy.pid, *proxy.worker_pids(), proxy.leader_pid()]:
                        subprocess.run(["taskset", "-a", "-p", "-c", "1", str(pid)], capture_output=True, check=False)
                yield upstream, proxy, workers, "0" if workers == 1 else None
            finally:
                proxy.stop()
    finally:
        upstream.stop()


def row(workers: int, label: str, result: dict[str, Any]) -> str:
    line = f"| {workers} | {label} | {result['rps']:,.0f} | {result['p50']} | {result['p99']} | {result['non2xx']} |"
    print(line, flush=True)
    return line


def throughput(args: argparse.Namespace, tmp: Path) -> list[str]:
    rows = []
    for _, proxy, workers, pin in proxies(tmp, conformance_documents(), args.workers):
        for name in args.scenarios:
            path, extra = SCENARIOS[name]
            run_wrk(proxy.url + path, extra, 2, args.connections, pin)  # warm-up
            rows.append(row(workers, name, run_wrk(proxy.url + path, extra, args.duration, args.connections, pin)))
    return rows


def _toggle_until(upstream: FakeFlagsmith, stop_at: float) -> None:
    while time.monotonic() < stop_at:
        upstream.toggle("ser.env_server_key_1", "show_banner")
        time.sleep(1.0)


def swap_latency(args: argparse.Namespace, tmp: Path) -> list[str]:
    """p99 of GET /api/v1/flags/ while a ~1 MB environment document is swapped in every second."""
    rows = []
    documents = {**conformance_documents(), "ser.env_server_key_1": about_one_megabyte()}
    for upstream, proxy, workers, pin in proxies(tmp, documents, args.workers, api_poll_frequency_seconds=0.5):
        url = proxy.url + "/api/v1/flags/"
        # a small environment's flags, so the measured requests are cheap and the swap shows
        extra = ["-H", "X-Environment-Key: env_client_key_2"]
        run_wrk(url, extra, 2, args.connections, pin)
        rows.append(row(workers, "no changes", run_wrk(url, extra, args.duration, args.connections, pin)))
        thread = threading.Thread(
            target=_toggle_until, args=(upstream, time.monotonic() + args.duration + 1), daemon=True
        )
        thread.start()
        busy = run_wrk(url, extra, args.duration, args.connections, pin)
        thread.join(args.duration + 5)
        rows.append(row(workers, "1 MB document changed every 1 s", busy))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=None, help="default: 32 (64 with --table, as issue 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=[*SCENARIOS, "swap"])
    parser.add_argument("--swap", action="store_true", help="also run the swap-latency scenario")
    parser.add_argument("--output", default=None, help="default: results/wrk.md (results/ceiling.md with --table)")
    parser.add_argument("--table", action="store_true", help="the proxy as a share of the server's floor")
    parser.add_argument("--rounds", type=int, default=3, help="--table: interleaved rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2, help="--table: seconds of warm-up per target and scenario")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 1
    if args.table:
        from benchmarks.wrk_table import run_table

        args.connections = args.connections or 64
        return run_table(args, HERE / "results" / "ceiling.md" if args.output is None else Path(args.output))
    args.output = args.output or str(HERE / "results" / "wrk.md")
    args.connections = args.connections or 32
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"edge-proxy-wrk-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = (
        f"\n## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit}\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'n/a'}), "
        f"Python {platform.python_version()}. wrk -t1 -c{args.connections} -d{args.duration}s --latency; "
        "1 worker: proxy pinned to CPU 1, wrk to CPU 0; 2 workers: unpinned, wrk on the same 2 CPUs.\n\n"
    )
    sections = [header]
    scenarios = [s for s in args.scenarios if s != "swap"]
    if scenarios:
        args.scenarios = scenarios
        sections.append("| workers | scenario | req/s | p50 | p99 | non-2xx |\n|---|---|---|---|---|---|\n")
        sections.append("\n".join(throughput(args, tmp)) + "\n")
    if args.swap:
        sections.append(
            "\nLatency of GET /api/v1/flags/ (another, small environment) while a 1 MB document is rebuilt:\n\n"
            "| workers | upstream | req/s | p50 | p99 | non-2xx |\n|---|---|---|---|---|---|\n"
        )
        sections.append("\n".join(swap_latency(args, tmp)) + "\n")
    with open(args.output, "a") as out:
        out.write("".join(sections))
    print(f"appended to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
