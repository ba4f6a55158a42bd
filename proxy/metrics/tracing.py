"""OpenTelemetry traces: off by default, configured by the standard `OTEL_*` environment variables.

On when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (or
`OTEL_TRACES_EXPORTER=otlp`), unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. Each process
(every worker, the leader) then runs its own SDK: a batch span processor and the OTLP/HTTP exporter, which
read the other variables themselves (`OTEL_EXPORTER_OTLP_HEADERS`, `..._TIMEOUT`, `..._COMPRESSION`,
`OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`).

* Workers: one SERVER span per request (`RequestTracer`, called by `EdgeControls`): named by method and
  route template, with the status and the environment's id, never a key or a raw path (paths may hold
  keys); an incoming `traceparent` / `tracestate` is honoured.
* Leader: one CLIENT span per environment document fetch (`fetch_span`), pages included, with
  `traceparent` sent upstream.

When off nothing of OpenTelemetry is imported, and the request path pays one attribute test
(`EdgeControls.active`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from proxy import __version__

log = logging.getLogger("proxy.tracing")

SERVICE_NAME = "edge-proxy"
ENVIRONMENT_ID = "flagsmith.environment.id"

_provider: Any = None  # this process's TracerProvider, once started


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    if exporter not in ("", "otlp"):
        log.warning("OTEL_TRACES_EXPORTER=%s: only otlp (OTLP over HTTP) is supported; traces are off", exporter)
        return False
    return exporter == "otlp" or bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def start(role: str) -> Any:
    """This process's tracer when traces are on (its SDK set up once), else None."""
    global _provider
    if not enabled():
        return None
    if _provider is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attributes: dict[str, Any] = {"service.version": __version__, "edge_proxy.role": role}
        if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        ):
            attributes["service.name"] = SERVICE_NAME
        _provider = TracerProvider(resource=Resource.create(attributes))
        _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("traces on: OTLP/HTTP to %s", _endpoint())
    return _provider.get_tracer("edge-proxy", __version__)


def _endpoint() -> str:
    # for the log line only (the exporter reads the variables itself); credentials never appear in these
    traces = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return traces or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318").rstrip("/") + "/v1/traces"


def shutdown() -> None:
    """Export what is buffered (at process exit); a no-op when traces are off."""
    global _provider
    if _provider is not None:
        with contextlib.suppress(Exception):
            _provider.shutdown()
        _provider = None


class RequestTracer:
    """Server spans for a worker's requests, from raw ASGI values (framework-free, as `EdgeControls`)."""

    def __init__(self, tracer: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.tracer = tracer
        self.kind = trace.SpanKind.SERVER
        self.error = trace.Status(trace.StatusCode.ERROR)
        self.propagator = TraceContextTextMapPropagator()
        self._trace = trace
        self._flags = {flags: trace.TraceFlags(flags) for flags in range(256)}

    def start(self, method: str, route: str | None, headers: Iterable[tuple[bytes, bytes]]) -> Any:
        traceparent = tracestate = None
        for name, value in headers:
            if name == b"traceparent":
                traceparent = value
            elif name == b"tracestate":
                tracestate = value
        context = self._parent(traceparent, tracestate) if traceparent is not None else None
        attributes: dict[str, Any] = {"http.request.method": method}
        if route is not None:
            attributes["http.route"] = route
        span_name = f"{method} {route}" if route is not None else method
        return self.tracer.start_span(span_name, context=context, kind=self.kind, attributes=attributes)

    def _parent(self, traceparent: bytes, tracestate: bytes | None) -> Any:
        """The caller's context from a W3C `traceparent` (version 00 form; anything else: the SDK's parser).
        Parsed here because the propagator's regular expressions cost more than the rest of the span."""
        parts = traceparent.strip().split(b"-")
        if tracestate is not None or len(parts) != 4 or parts[0] != b"00" or len(parts[1]) != 32 or len(parts[2]) != 16:
            carrier = {"traceparent": traceparent.decode("latin-1")}
            if tracestate is not None:
                carrier["tracestate"] = tracestate.decode("latin-1")
            return self.propagator.extract(carrier)
        try:
            trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
        except ValueError:
            return None
        if not trace_id or not span_id or not 0 <= flags < 256:
            return None  # invalid per the spec: start a new trace
        parent = self._trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=self._flags[flags])
        return self._trace.set_span_in_context(self._trace.NonRecordingSpan(parent))

    def end(self, span: Any, status: int, environment_id: int | None) -> None:
        if environment_id is not None:
            span.set_attributes({"http.response.status_code": status, ENVIRONMENT_ID: environment_id})
        else:
            span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(self.error)
        span.end()


class FetchSpan:
    """An upstream fetch's span: the headers to send with it, and its outcome. Inert when traces are off."""

    def __init__(self, span: Any = None) -> None:
        self.span = span
        self.headers: dict[str, str] = {}
        if span is not None:
            from opentelemetry.trace import set_span_in_context
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            TraceContextTextMapPropagator().inject(self.headers, context=set_span_in_context(span))

    def outcome(self, status: int | None, environment_id: Any = None, error: str | None = None) -> None:
        span = self.span
        if span is None:
            return
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if isinstance(environment_id, int) and not isinstance(environment_id, bool):
            span.set_attribute(ENVIRONMENT_ID, environment_id)
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR, error))


@contextlib.contextmanager
def fetch_span(tracer: Any, name: str, url: str) -> Iterator[FetchSpan]:
    """A CLIENT span around one upstream fetch (`tracer` None: an inert one). `url` must hold no secret."""
    if tracer is None:
        yield FetchSpan()
        return
    from opentelemetry.trace import SpanKind

    attributes = {"http.request.method": "GET", "url.full": url}
    with tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes) as span:
        yield FetchSpan(span)
