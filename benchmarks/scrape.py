"""What the operations routes cost at scale: /metrics, health and status with many environments.

    .venv/bin/python -m benchmarks.scrape --environments 10000

Starts the lean upstream of benchmarks/scale.py with that many small environments, `edge-proxy serve` with 2
workers discovering them through the proxy key, waits until every worker is ready, then asks each route
`--repeat` times on fresh connections and prints the body size, the wall time and the CPU the answering
worker spent (the most any worker spent over the request, from /proc). Everything stops by itself.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.scale import PROXY_KEY, LeanUpstream, cpu_seconds, request, workers_ready
from tests.support import ProxyProcess

ROUTES = ["/metrics", "/proxy/health", "/proxy/health/readiness", "/proxy/status"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--environments", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    upstream = LeanUpstream(args.environments)
    config: dict[str, Any] = {
        "api_url": upstream.api_url,
        "api_poll_frequency_seconds": 60,
        "api_poll_timeout_seconds": 10,
        "proxy_key": PROXY_KEY,
        # show_details: the readiness check tells the workers apart (and health lists every source)
        "health_check": {"environment_update_grace_period_seconds": 600, "show_details": True},
        "logging": {"log_level": "WARNING"},
    }
    proxy = ProxyProcess(Path(tempfile.mkdtemp(prefix="edge-proxy-scrape-")), config, workers=2).start()
    try:
        proxy.wait_live(120)
        if not workers_ready(proxy, 2, 600):
            raise RuntimeError(f"not ready:\n{proxy.log()[-3000:]}")
        time.sleep(5)
        workers = proxy.worker_pids()
        print(f"{args.environments} environments, 2 workers")
        print("| route | status | bytes | wall | answering worker's CPU |")
        print("|---|---|---|---|---|")
        for route in ROUTES:
            for _ in range(args.repeat):
                before = {pid: cpu_seconds(pid) for pid in workers}
                started = time.monotonic()
                status, _, body = request(proxy.port, "GET", route, {})
                wall = time.monotonic() - started
                cpu = max(cpu_seconds(pid) - before[pid] for pid in workers)
                print(f"| `{route}` | {status} | {len(body):,} | {wall * 1000:.0f} ms | {cpu * 1000:.0f} ms |")
    finally:
        proxy.stop()
        upstream.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
