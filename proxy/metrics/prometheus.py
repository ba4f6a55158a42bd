"""Prometheus metrics, aggregated across the leader and every worker (prometheus-client multiprocess mode).

`PROMETHEUS_MULTIPROC_DIR` must be set before `prometheus_client` is first imported; `edge-proxy serve`
sets it to a folder inside the shared-memory area before anything else. Request counting and latency on
the hot path are plain int increments in a per-worker table (`observe`, well under 1 µs); `flush` moves
them into the multiprocess counter and histogram off the request path (a multiprocess `observe()` costs
about 1.5 µs). HTTP metrics have the names and labels of Flagsmith's API (`flagsmith_*`), so dashboards
built for it work here; `edge_proxy_*` is what only a proxy has. Per-environment series are computed at
scrape time from the leader's manifest (`proxy.metrics.environments`), labelled by the document's name and
id, so a removed or renamed environment leaves no series behind.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from proxy import __version__
from proxy.area.processes import archive_lock

# -- Flagsmith API's shapes ---------------------------------------------------------------------------
# Flagsmith's buckets are prometheus-client's defaults (5 ms … 10 s); ours start lower because answers here
# take tens of µs, and include every default bound so queries written for Flagsmith's API still work.
LATENCY_BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075)
LATENCY_BUCKETS += (0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
HTTP_LABELS = ["route", "method", "response_status"]
HTTP_SERVER_REQUESTS = Counter("flagsmith_http_server_requests", "Total number of HTTP requests", HTTP_LABELS)
HTTP_SERVER_REQUEST_DURATION = Histogram(
    "flagsmith_http_server_request_duration_seconds",
    "HTTP request duration in seconds (inside the application, from routing to the response)",
    HTTP_LABELS,
    buckets=LATENCY_BUCKETS,
)
BUILD_INFO = Gauge(
    "flagsmith_build_info",
    "Version and build information (of this edge proxy)",
    ["ci_commit_sha", "version"],
    multiprocess_mode="livemax",
)
COMMIT_SHA_ENV = "EDGE_PROXY_COMMIT_SHA"  # set at image build time (Dockerfile ARG VCS_REF)

# -- proxy-specific -----------------------------------------------------------------------------------
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
    "Flag evaluations reported by SDKs, by outcome (forwarded, rejected, dropped; retried: kept for the next flush)",
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
WORKER_RESTARTS = Counter(
    "edge_proxy_worker_restarts", "Worker processes that ended while the proxy kept serving (Granian replaces them)"
)
UPSTREAM_FETCH_ERRORS = Counter(
    "edge_proxy_upstream_fetch_errors",
    "Failed environment document fetches by reason (timeout, network, http_4xx, http_5xx, invalid_json, ...)",
    ["reason"],
)
UPSTREAM_FETCH_SECONDS = Histogram(
    "edge_proxy_upstream_fetch_seconds",
    "Time to fetch one environment document from upstream (all pages), whatever the outcome",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PUBLISHED_GENERATION = Gauge(
    "edge_proxy_published_generation",
    "The generation the leader last published to the shared-memory area",
    multiprocess_mode="livemax",
)
WORKER_GENERATION = Gauge(
    "edge_proxy_worker_generation",
    "The generation each worker (by pid) has loaded; behind edge_proxy_published_generation for long = stuck",
    ["worker"],  # labelled so that only workers have a series (an unlabelled gauge exists in every process)
    multiprocess_mode="livemax",
)
IDENTITY_CACHE_EVICTIONS = Counter(
    "edge_proxy_identity_cache_evictions", "Identity responses evicted from the per-worker LRU (entries or bytes full)"
)
IDENTITY_CACHE_ENTRIES = Gauge(
    "edge_proxy_identity_cache_entries", "Identity responses held, summed over workers", multiprocess_mode="livesum"
)
IDENTITY_CACHE_BYTES = Gauge(
    "edge_proxy_identity_cache_bytes",
    "Estimated bytes of identity responses held, summed over workers",
    multiprocess_mode="livesum",
)
USAGE_ROWS = Counter(
    "edge_proxy_usage_rows",
    "Usage report rows (proxy_key) by outcome of their post (accepted, rejected, retried)",
    ["outcome"],
)
STREAMS_CONNECTED = Gauge(
    "edge_proxy_streams_connected",
    "Open real-time (server-sent events) streams, summed over live workers",
    multiprocess_mode="livesum",
)
STREAM_EVENTS = Counter("edge_proxy_stream_events", "Events sent on real-time streams (one per stream per change)")
STREAMS_REJECTED = Counter(
    "edge_proxy_streams_rejected", "Streams refused because a worker held realtime.max_streams_per_worker"
)
WEBHOOKS = Counter(
    "edge_proxy_webhooks",
    "Flagsmith webhooks received, by outcome (accepted, unsigned, bad_signature, malformed, replayed)",
    ["outcome"],
)
REFRESH_REQUESTS = Counter(
    "edge_proxy_refresh_requests", "On-demand refreshes asked of the leader, by trigger", ["trigger"]
)
REGEX_TIMEOUTS = Counter(
    "edge_proxy_regex_timeouts",
    "REGEX condition matches stopped at their deadline and answered as no match (patterns RE2 cannot run)",
)
UPSTREAM_STREAM_EVENTS = Counter(
    "edge_proxy_upstream_stream_events", "Newer documents announced by the upstream proxy's stream"
)
SNAPSHOTS_REJECTED = Counter(
    "edge_proxy_snapshots_rejected",
    "Stored snapshots not served, by reason (unauthenticated, truncated, unreadable, version, environment,"
    " not_document); each environment and reason counted once",
    ["reason"],
)
ACCESS_DENIED = Counter(
    "edge_proxy_access_denied",
    "Requests refused (403) by a network allow list, by list (access.public, access.server_keys, access.operations)",
    ["list"],
)
RATE_LIMITED = Counter(
    "edge_proxy_rate_limited",
    "Requests refused (429) by a rate limit, by limit (per_client_address, per_key)",
    ["limit"],
)
FANOUT_MESSAGES = Counter(
    "edge_proxy_fanout_messages",
    "Change messages between replicas through Redis, by direction (sent, received) and outcome"
    " (sent: ok, dropped; received: refresh, ignored)",
    ["direction", "outcome"],
)
SHARED_REPLAY_ERRORS = Counter(
    "edge_proxy_webhook_shared_replay_errors",
    "Webhooks checked against this replica's replay markers only, because Redis did not answer",
)

BUILD_INFO.labels(ci_commit_sha=os.environ.get(COMMIT_SHA_ENV) or "unknown", version=__version__).set(1)

analytics_ignored = [0]  # one plain integer, incremented on the request path
# refusals by the edge controls (proxy/http/edge_controls.py): plain integers on the request path, flushed
access_denied = {"access.public": 0, "access.server_keys": 0, "access.operations": 0}
rate_limited = {"per_client_address": 0, "per_key": 0}
_flushed: dict[object, int] = {}

# -- request counting and latency on the hot path -----------------------------------------------------
# (route, method, status) → [count per bucket (last: +Inf), ..., sum of seconds]; this worker's totals.
# A client that disconnects mid-request is counted with nginx's 499.
request_latency: dict[tuple[str, str, int], list[Any]] = {}
_latency_flushed: dict[tuple[str, str, int], list[Any]] = {}
_HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
_ROW_SIZE = len(LATENCY_BUCKETS) + 2
_FIRST_BOUND = LATENCY_BUCKETS[0]


def observe(route: str, method: str, status: int, seconds: float) -> None:
    """Count one request and its duration: a dict lookup, a bucket index and two list increments."""
    row = request_latency.get((route, method, status))
    if row is None:
        row = _new_row(route, method, status)
    # `le` buckets are inclusive: the first bound >= seconds (+Inf past the last). Most answers here take
    # less than the first bound, so that comparison comes before the bisect (saves ~150 ns).
    row[0 if seconds <= _FIRST_BOUND else bisect_left(LATENCY_BUCKETS, seconds)] += 1
    row[-1] += seconds


def _new_row(route: str, method: str, status: int) -> list[Any]:
    if method not in _HTTP_METHODS:
        method = "other"  # any token is a valid HTTP method: the label set stays bounded (no entry per token)
    key = (route, method, status)
    row = request_latency.get(key)
    if row is None:
        row = request_latency[key] = [0] * (_ROW_SIZE - 1) + [0.0]
    return row


def _flush_requests() -> None:
    for key, row in list(request_latency.items()):
        done = _latency_flushed.get(key)
        if done is None:
            done = _latency_flushed[key] = [0] * (_ROW_SIZE - 1) + [0.0]
        count = sum(row[:-1]) - sum(done[:-1])
        if not count:
            continue
        route, method, status = key
        labels = {"route": route, "method": method, "response_status": str(status)}
        histogram = HTTP_SERVER_REQUEST_DURATION.labels(**labels)
        # prometheus-client has no public "add n observations to bucket i": its per-bucket values are what
        # observe() increments, and the multiprocess collector accumulates them into cumulative buckets.
        for index in range(_ROW_SIZE - 1):
            delta = row[index] - done[index]
            if delta:
                histogram._buckets[index].inc(delta)
        histogram._sum.inc(row[-1] - done[-1])
        HTTP_SERVER_REQUESTS.labels(**labels).inc(count)
        _latency_flushed[key] = list(row)


def flush_worker(generation: int, cache_entries: int, cache_bytes: int, cache_evictions: int) -> None:
    """A worker's gauges and remaining counters, with `flush` (live gauges vanish with a dead worker)."""
    WORKER_GENERATION.labels(worker=str(os.getpid())).set(generation)
    IDENTITY_CACHE_ENTRIES.set(cache_entries)
    IDENTITY_CACHE_BYTES.set(cache_bytes)
    _flush("cache_evictions", cache_evictions, IDENTITY_CACHE_EVICTIONS)


def _flush(key: object, count: int, child: Counter) -> None:
    delta = count - _flushed.get(key, 0)
    if delta:
        child.inc(delta)
        _flushed[key] = count


def flush(cache_hits: int = 0, cache_misses: int = 0, regex_timeouts: int = 0) -> None:
    """Move this worker's plain counters into the multiprocess metrics (off the request path)."""
    _flush_requests()
    _flush("cache_hit", cache_hits, IDENTITY_CACHE.labels(result="hit"))
    _flush("cache_miss", cache_misses, IDENTITY_CACHE.labels(result="miss"))
    _flush("analytics_ignored", analytics_ignored[0], ANALYTICS_IGNORED)
    _flush("regex_timeouts", regex_timeouts, REGEX_TIMEOUTS)
    for name, count in access_denied.items():
        if count:
            _flush(("access_denied", name), count, ACCESS_DENIED.labels(list=name))
    for name, count in rate_limited.items():
        if count:
            _flush(("rate_limited", name), count, RATE_LIMITED.labels(limit=name))


class ScrapeRenderer(Protocol):
    """Series computed at scrape time, written as exposition text (proxy/metrics/environments.py)."""

    def render(self) -> bytes: ...


# What the worker answering /metrics adds at scrape time (per-environment series).
scrape_collectors: list[ScrapeRenderer] = []


def render() -> bytes:
    extra = b"".join(collector.render() for collector in scrape_collectors)
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped in prometheus-client
        with archive_lock(Path(folder)):  # the leader may be archiving a dead process's files
            collected = generate_latest(registry)
        return collected + extra
    return generate_latest() + extra


__all__ = ["CONTENT_TYPE", "render"]
