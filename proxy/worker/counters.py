"""What one worker counts on the request path, and the one flush that moves it out (about once a second).

Request and cache counts go to the Prometheus multiprocess counters (`proxy/metrics/prometheus.py`); SDK analytics
and usage (with a proxy_key) are handed to the leader through the shared-memory area
(`proxy/area/mailboxes.py`). On the request path each count is a dict increment.
"""

from __future__ import annotations

from pathlib import Path

from proxy.area.mailboxes import CountsBuffer
from proxy.area.names import ANALYTICS, USAGE
from proxy.evaluation import safe_regex
from proxy.metrics import prometheus as metrics
from proxy.worker.response_cache import ResponseCache


class WorkerCounters:
    def __init__(self, cache: ResponseCache | None, usage: bool) -> None:
        self.cache = cache
        self.analytics = CountsBuffer(ANALYTICS)
        self.usage = CountsBuffer(USAGE) if usage else None

    def flush_metrics(self, generation: int) -> None:
        """Into the multiprocess metrics: counts since the last flush, and this worker's gauges."""
        cache = self.cache
        metrics.flush(cache.hits if cache else 0, cache.misses if cache else 0, safe_regex.timeouts[0])
        metrics.flush_worker(
            generation,
            len(cache) if cache else 0,
            cache.size_bytes if cache else 0,
            cache.evictions if cache else 0,
        )

    def hand_over(self, area: Path) -> None:
        """Give the leader this worker's analytics and usage counts."""
        self.analytics.hand_over(area)
        if self.usage is not None:
            self.usage.hand_over(area)

    def flush(self, area: Path, generation: int) -> None:
        self.flush_metrics(generation)
        self.hand_over(area)
