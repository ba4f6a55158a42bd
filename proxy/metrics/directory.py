"""The one place that points prometheus-client's multiprocess mode at the shared-memory area.

prometheus_client reads `PROMETHEUS_MULTIPROC_DIR` once, when it is first imported, and every process (the
main one, the leader, each worker) must use the same directory. `edge-proxy serve` calls
`point_metrics_at` before anything imports prometheus_client; the leader and the workers inherit the
variable. Called too late, it refuses loudly instead of leaving metrics silently per process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def point_metrics_at(directory: Path) -> None:
    if "prometheus_client" in sys.modules and os.environ.get(ENV) != str(directory):
        raise RuntimeError(f"prometheus_client was imported before {ENV} was set: metrics would not aggregate")
    os.environ[ENV] = str(directory)
