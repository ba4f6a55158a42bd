"""The same proxy in several configurations beside the raw-ASGI floor, one wrk scenario, interleaved rounds.

Each variant is a set of environment variables for `edge-proxy serve` (settings as the README's table names
them, or `OTEL_*`), `;`-separated; `base` is the proxy as configured by tests/support.py `proxy_config`.
Every server is one Granian worker with all its processes pinned to CPU 1, wrk pinned to CPU 0 (as
`make wrk-table`). What a feature costs per request is the difference of 1 / (req/s) between its variant and
`base` in the same run.

    .venv/bin/python -m benchmarks.variants flags base \\
        'OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:9' \\
        'RATE_LIMITS={"per_client_address":{"requests_per_second":1000000}}'
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.wrk_run import SCENARIOS, run_wrk
from benchmarks.wrk_table import WRK_CPU, Target, start_floor
from tests.fake_upstream import FakeFlagsmith
from tests.support import ProxyProcess, conformance_documents, proxy_config


def variant_environment(variant: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in variant.split(";") if "=" in part)


def start_variant(tmp: Path, upstream: FakeFlagsmith, variant: str) -> ProxyProcess:
    saved = dict(os.environ)
    os.environ.update(variant_environment(variant))  # ProxyProcess passes its environment on
    try:
        folder = tmp / hashlib.sha256(variant.encode()).hexdigest()[:12]
        return ProxyProcess(folder, proxy_config(upstream.api_url), workers=1).start()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=list(SCENARIOS))
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"edge-proxy-variants-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    upstream = FakeFlagsmith(conformance_documents()).start()
    proxies: list[ProxyProcess] = []
    floor_process: subprocess.Popen[bytes] | None = None
    try:
        targets: dict[str, Target] = {}
        for variant in args.variants:
            proxy = start_variant(tmp, upstream, variant)
            proxies.append(proxy)
            proxy.wait_ready()
            targets[variant] = Target(variant, proxy.url, proxy.pid)
        floor_process, targets["raw ASGI floor"] = start_floor(tmp, "raw")
        for target in targets.values():
            target.pin()
        time.sleep(1)
        path, extra = SCENARIOS[args.scenario]
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        for round_number in range(args.rounds):
            order = list(targets.items())
            for name, target in order if round_number % 2 == 0 else reversed(order):
                if round_number == 0:
                    run_wrk(target.url + path, extra, 2, args.connections, WRK_CPU)
                before = target.cpu_seconds()
                run: dict[str, Any] = run_wrk(target.url + path, extra, args.duration, args.connections, WRK_CPU)
                cpu = target.cpu_seconds() - before
                results[name].append((run["rps"], run["requests"] / cpu if cpu else 0.0))
        floor = statistics.median(rps for rps, _ in results["raw ASGI floor"])
        base = statistics.median(rps for rps, _ in results[args.variants[0]])
        print(f"scenario {args.scenario}, wrk -t1 -c{args.connections} -d{args.duration:g}s, {args.rounds} rounds")
        print("| variant | req/s (median) | req/CPU-s | share of the floor | µs per request above the first |")
        print("|---|---|---|---|---|")
        for name, runs in results.items():
            rps = statistics.median(rps for rps, _ in runs)
            per_cpu = statistics.median(per for _, per in runs)
            extra_us = (1 / rps - 1 / base) * 1e6
            print(f"| `{name}` | {rps:,.0f} | {per_cpu:,.0f} | {100 * rps / floor:.0f} % | {extra_us:+.1f} |")
    finally:
        if floor_process is not None:
            floor_process.terminate()
            floor_process.wait(30)
        for proxy in proxies:
            proxy.stop()
        upstream.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
