"""Micro-benchmarks of the request path and the publication path (pytest-benchmark).

Run: `make bench` (or `.venv/bin/pytest benchmarks --benchmark-enable --benchmark-only`).
Recorded results: benchmarks/results/README.md.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from flag_engine.engine import get_evaluation_result
from flagsmith.mappers import map_context_and_identity_data_to_context, map_environment_document_to_context

from benchmarks.documents import HEAVY_TRAITS, about_one_megabyte, base_document, heavy_document, with_overrides
from proxy.area.bodies import KeyKind
from proxy.area.manifest import ManifestEntry
from proxy.area.publication import Area, Publisher, Subscriber
from proxy.config.settings import Settings
from proxy.evaluation.environment import answers_for
from proxy.http.routes import route_of
from proxy.metrics import prometheus as metrics
from proxy.worker.environment import EnvironmentState
from proxy.worker.evaluators import Evaluator
from proxy.worker.store import Store

TRAITS = {"plan": "premium", "age": 30, "country": "GB"}


def state_of(document: dict[str, Any]) -> EnvironmentState:
    return EnvironmentState.of_document(document["api_key"], orjson.dumps(document))


@pytest.fixture(scope="module")
def store() -> Store:
    document = base_document()
    settings = Settings(
        environment_key_pairs=[{"server_side_key": "ser.env_server_key_1", "client_side_key": document["api_key"]}]
    )
    store = Store(settings)
    store.states = {document["api_key"]: state_of(document)}
    return store


def test_flags_lookup(benchmark: Any, store: Store) -> None:
    """Key → state → pre-encoded body: what GET /api/v1/flags/ costs beyond the framework."""
    key = b"env_client_key_1"

    def lookup() -> bytes:
        kind, state = store.resolve(key)
        return state.flags(kind).plain

    assert benchmark(lookup).startswith(b"[")


def test_identity_uncached(benchmark: Any) -> None:
    state = state_of(base_document())

    def evaluate() -> bytes:
        flags = state.identity_flags(KeyKind.CLIENT, "user-42", TRAITS)
        return orjson.dumps({"identifier": "user-42", "traits": [], "flags": flags})

    assert benchmark(evaluate)


PROFILES = {"conformance": base_document, "heavy": heavy_document}


@pytest.fixture(scope="module", params=list(PROFILES))
def profile_state(request: pytest.FixtureRequest) -> EnvironmentState:
    return state_of(PROFILES[request.param]())


@pytest.mark.parametrize("evaluator", ["compiled", "flag-engine"])
def test_identity_body_random_identifier(benchmark: Any, profile_state: EnvironmentState, evaluator: str) -> None:
    """An uncached identity response (random identifier + 3 traits): compiled evaluator vs flag-engine."""
    state = profile_state
    built = Evaluator(state.client_key, state.document_bytes())
    assert built.compiled is not None
    identifiers = iter(f"user-{i}" for i in range(10**9))
    echo = [{"trait_key": k, "trait_value": v} for k, v in HEAVY_TRAITS.items()]

    def compiled() -> bytes:
        return built.identity_body(KeyKind.CLIENT, next(identifiers), echo, HEAVY_TRAITS)

    def engine() -> bytes:
        identifier = next(identifiers)
        flags = built._engine_flags(KeyKind.CLIENT, identifier, HEAVY_TRAITS)
        return orjson.dumps({"identifier": identifier, "traits": echo, "flags": flags})

    assert compiled()[-2:] == engine()[-2:] == b"]}"
    benchmark(compiled if evaluator == "compiled" else engine)


@pytest.mark.parametrize("overrides", [0, 1800])
def test_identity_cost_does_not_grow_with_overrides(benchmark: Any, overrides: int) -> None:
    state = state_of(with_overrides(overrides))
    benchmark(state.identity_flags, KeyKind.CLIENT, "override-user-7", TRAITS)


@pytest.mark.parametrize("overrides", [0, 60])
def test_sdk_style_per_request_mapping(benchmark: Any, overrides: int) -> None:
    """For contrast: what the Python proxy does per request (map the document, then evaluate)."""
    document = with_overrides(overrides)

    def evaluate() -> Any:
        context = map_environment_document_to_context(copy.deepcopy(document))
        context = map_context_and_identity_data_to_context(context, "override-user-7", TRAITS)
        return get_evaluation_result(context)

    benchmark(evaluate)


def test_request_metrics(benchmark: Any) -> None:
    """What the middleware adds per request for metrics: two clock reads, the route lookup, `observe` (< 1 µs)."""
    path = b"/api/v1/flags/"

    def count() -> None:  # the middleware's counting lines, as written there
        started = time.perf_counter()
        route = route_of(path)
        metrics.observe(route[0] if route else "unmatched", "GET", 200, time.perf_counter() - started)

    # Many calls per round: one call is close to the timer's own overhead.
    benchmark.pedantic(count, rounds=200, iterations=1000, warmup_rounds=5)
    if not benchmark.disabled:
        assert benchmark.stats.stats.median < 1e-6


# -- edge controls (issue 21): what the middleware adds with each control off and on ----------------------

EDGE_CONTROLS: dict[str, dict[str, Any]] = {
    "off": {},
    "access": {"access": {"public": ["127.0.0.0/8"]}},
    "access+limits": {
        "access": {"public": ["127.0.0.0/8"]},
        # never refuses: the benchmark measures the bucket update, not the 429
        "rate_limits": {
            "per_client_address": {"requests_per_second": 1e9, "burst": 1_000_000_000},
            "per_key": {"requests_per_second": 1e9, "burst": 1_000_000_000},
        },
    },
    "tracing": {},  # a span per request (the SDK's batch processor; its export discarded), traceparent sent
    "tracing-1%": {},  # the same sampling 1 % of new traces (OTEL_TRACES_SAMPLER=parentbased_traceidratio)
}


def discarding_tracer(ratio: float = 1.0) -> Any:
    """An OpenTelemetry SDK tracer as the proxy sets one up, whose exporter drops what it is handed."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    return provider.get_tracer("benchmark")


@pytest.mark.parametrize("controls", list(EDGE_CONTROLS))
def test_middleware_edge_controls(benchmark: Any, controls: str, tmp_path: Path) -> None:
    """`HotRoutes.serve` (the one wrapper of both request paths) around a handler that answers at once, for
    `GET /api/v1/flags/` with a client key: the wrapper's whole cost (metrics and CORS lookup included) with
    the edge controls off and on. Rate limits use the shared, locked bucket tables of a real area."""
    from proxy.http.edge_controls import EdgeControls
    from proxy.http.exchange import Call, Reply
    from proxy.http.hot import HotRoutes
    from proxy.supervisor.server import create_bucket_tables

    settings = Settings(
        environment_key_pairs=[{"server_side_key": "ser.env_server_key_1", "client_side_key": "env_client_key_1"}],
        **EDGE_CONTROLS[controls],
    )
    area = Area(Path("/dev/shm") / f"edge-proxy-bench.{os.getpid()}.{tmp_path.name}")
    area.create()
    try:
        create_bucket_tables(settings, area.path)
        store = Store(settings)
        store.area = area.path
        app = HotRoutes(settings, store)
        headers = [(b"host", b"127.0.0.1"), (b"x-environment-key", b"env_client_key_1"), (b"accept", b"*/*")]
        if controls == "tracing":
            app.controls = EdgeControls(settings, lambda: area.path, tracer=discarding_tracer())
            headers.append((b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))
        elif controls == "tracing-1%":
            app.controls = EdgeControls(settings, lambda: area.path, tracer=discarding_tracer(0.01))

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        request = Call("GET", b"/api/v1/flags/", b"", headers, receive, "", ("127.0.0.1", 50000))

        async def handler(_: Call) -> Reply:
            return Reply(200, [], None)

        def call() -> Reply:
            # the coroutine never suspends: drive it by hand, no event loop in the measurement
            coroutine = app.serve(request, "/api/v1/flags/", handler)
            try:
                coroutine.send(None)
            except StopIteration as done:
                result: Reply = done.value
                return result
            raise AssertionError("the wrapper suspended")

        assert call().status == 200
        benchmark.pedantic(call, rounds=200, iterations=200, warmup_rounds=5)
        for limiter in (app.controls.per_address, app.controls.per_key):
            if limiter is not None and limiter.table is not None:
                limiter.table.close()
    finally:
        area.remove()


def test_rate_limit_take(benchmark: Any, tmp_path: Path) -> None:
    """One token from a shared bucket table: hash lookup, lock, read, update, unlock (per limit and request)."""
    from proxy.area import buckets

    buckets.create(tmp_path / "table", 65_536)
    table = buckets.BucketTable(tmp_path / "table")
    try:
        benchmark.pedantic(table.take, args=(b"a127.0.0.1", 1e9, 1e9), rounds=200, iterations=200, warmup_rounds=5)
    finally:
        table.close()


@pytest.fixture
def area(tmp_path: Path) -> Any:
    created = Area(Path("/dev/shm") / f"edge-proxy-bench.{os.getpid()}.{tmp_path.name}")
    created.create()
    yield created
    created.remove()


def test_generation_check(benchmark: Any, area: Area) -> None:
    """A worker's 'anything new?' check."""
    with Subscriber(area.path) as subscriber:
        assert benchmark(subscriber.changed) is False


def test_publish_one_megabyte(benchmark: Any, area: Area) -> None:
    data = orjson.dumps(about_one_megabyte())
    entries = {"a": ManifestEntry(server_keys={"ser.a": None}, name="a", last_success=1.0)}
    with Publisher(area.path) as publisher:
        benchmark(lambda: publisher.publish({"a": data}, dict(entries)))


def test_answers_one_megabyte(benchmark: Any) -> None:
    """Leader-side cost of a new 1 MB document: its answers evaluated and encoded (in a thread)."""
    data = orjson.dumps(about_one_megabyte())
    benchmark.pedantic(answers_for, args=(data,), rounds=10, iterations=1)


def test_evaluator_one_megabyte(benchmark: Any) -> None:
    """Worker-side cost of a 1 MB environment's first identity request: its evaluator (in a thread)."""
    data = orjson.dumps(about_one_megabyte())
    benchmark.pedantic(Evaluator, args=("k", data), rounds=10, iterations=1)
