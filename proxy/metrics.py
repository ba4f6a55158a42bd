"""Prometheus metrics, aggregated across the leader and every worker (prometheus-client multiprocess mode).

`PROMETHEUS_MULTIPROC_DIR` must be set before `prometheus_client` is first imported; `edge-proxy serve`
sets it to a folder inside the shared-memory area before anything else. Request counting on the hot
path is a plain dict increment per worker; `flush` moves the counts into the
multiprocess counters off the request path (a multiprocess `inc()` costs about 0.7 µs).
"""

from __future__ import annotations

import os
from collections import defaultdict

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

HTTP_REQUESTS = Counter("edge_proxy_http_requests", "HTTP requests served, by route and status", ["route", "status"])
IDENTITY_CACHE = Counter("edge_proxy_identity_cache", "Identity response cache lookups", ["result"])
UPSTREAM_FETCHES = Counter(
    "edge_proxy_upstream_fetches",
    "Environment document fetches by outcome (ok, not_modified, error)",
    ["outcome"],
)
PUBLICATION_ERRORS = Counter("edge_proxy_publication_errors", "Failed publications to the shared-memory area")
PUBLICATION_SECONDS = Histogram(
    "edge_proxy_publication_seconds",
    "Time to publish a generation to the shared-memory area",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
STATE_BUILD_ERRORS = Counter(
    "edge_proxy_environment_build_errors",
    "Published documents a worker could not build (previous state kept)",
)
STATE_BUILD_SECONDS = Histogram(
    "edge_proxy_environment_build_seconds",
    "Time for a worker to build one environment's state",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
ANALYTICS_EVENTS = Counter(
    "edge_proxy_analytics_events",
    "Flag evaluations reported by SDKs, by outcome (forwarded, rejected, dropped)",
    ["outcome"],
)
EVALUATOR_FALLBACKS = Counter(
    "edge_proxy_evaluator_fallbacks",
    "Times the compiled evaluator handed work to flag-engine, by reason and scope (environment or segment"
    " when a state is built; request for one request's unusual traits)",
    ["reason", "scope"],
)
ANALYTICS_IGNORED = Counter(
    "edge_proxy_analytics_ignored_names",
    "Feature names in SDK analytics that the environment does not have (ignored, never buffered)",
)
LEADER_RESTARTS = Counter("edge_proxy_leader_restarts", "Times the leader process was restarted")
ENVIRONMENT_LAST_SUCCESS = Gauge(
    "edge_proxy_environment_last_success_timestamp_seconds",
    "When upstream last answered well (200 or 304) for an environment (key masked); alert on its age",
    ["environment"],
    multiprocess_mode="max",  # set by the leader only; a restarted leader continues upwards
)

# Per-worker counts, flushed in the background: (route, status) → count. A client that disconnects
# mid-request is counted with nginx's 499.
request_counts: defaultdict[tuple[str, int], int] = defaultdict(int)
analytics_ignored = [0]  # one plain integer, incremented on the request path
_flushed: dict[object, int] = {}


def _flush(key: object, count: int, child: Counter) -> None:
    delta = count - _flushed.get(key, 0)
    if delta:
        child.inc(delta)
        _flushed[key] = count


def flush(cache_hits: int = 0, cache_misses: int = 0) -> None:
    """Move this worker's plain counters into the multiprocess metrics (off the request path)."""
    for (route, status), count in list(request_counts.items()):
        _flush((route, status), count, HTTP_REQUESTS.labels(route=route, status=str(status)))
    _flush("cache_hit", cache_hits, IDENTITY_CACHE.labels(result="hit"))
    _flush("cache_miss", cache_misses, IDENTITY_CACHE.labels(result="miss"))
    _flush("analytics_ignored", analytics_ignored[0], ANALYTICS_IGNORED)


def render() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


__all__ = ["CONTENT_TYPE", "render"]
