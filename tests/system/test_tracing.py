"""OpenTelemetry traces (issue 21, item 3): a real proxy exporting to a real OTLP/HTTP receiver (a small
HTTP server on 127.0.0.1 that decodes the protobuf posts with opentelemetry-proto), the fake Flagsmith API
checking that `traceparent` goes upstream."""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.fake_upstream import FakeFlagsmith
from tests.support import KEYS, ProxyProcess, proxy_config, wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
CLIENT_KEY = "env_client_key_1"


class OtlpReceiver:
    """Accepts `POST /v1/traces` (OTLP/HTTP, protobuf) and keeps every span with its resource."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(self.path, body, request)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes, request: ExportTraceServiceRequest) -> None:
        assert path == "/v1/traces"
        with self.lock:
            self.raw.append(body)
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            {
                                "name": span.name,
                                "kind": span.kind,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                                "status": span.status.code,
                                "resource": resource,
                            }
                        )

    def find(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self.lock:
            return [span for span in self.spans if predicate(span)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    found = OtlpReceiver()
    yield found
    found.stop()


SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 2, 3


def test_requests_and_upstream_fetches_are_traced(
    receiver: OtlpReceiver, upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
    }
    config = proxy_config(upstream.api_url, rate_limits={"per_key": {"requests_per_second": 0.001, "burst": 3}})
    proxy = start_proxy(config, workers=2, env=env)
    proxy.wait_ready()
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    key = {"X-Environment-Key": CLIENT_KEY}
    answer = httpx.get(f"{proxy.url}/api/v1/flags/", headers={**key, "traceparent": traceparent}, timeout=10)
    assert answer.status_code == 200
    # the incoming trace is continued: our span is the caller's child, in its trace
    [flags] = wait_for_spans(receiver, lambda s: s["trace_id"] == TRACE_ID)
    assert flags["name"] == "GET /api/v1/flags/" and flags["kind"] == SPAN_KIND_SERVER
    assert flags["parent_span_id"] == PARENT_ID
    assert flags["attributes"] == {
        "http.request.method": "GET",
        "http.route": "/api/v1/flags/",
        "http.response.status_code": 200,
        "flagsmith.environment.id": 1,
    }
    assert flags["resource"]["service.name"] == "edge-proxy"
    assert flags["resource"]["deployment.environment"] == "test"
    # a stream, whose path holds the key: named by its template; refusals (429 here) are spans too
    with httpx.stream("GET", f"{proxy.url}/sse/environments/{CLIENT_KEY}/stream", timeout=10) as stream:
        assert stream.status_code == 200  # the span covers the answer's start, not the stream's life
    for _ in range(3):
        httpx.get(f"{proxy.url}/api/v1/identities/", params={"identifier": "u"}, headers=key, timeout=10)
    refused = wait_for_spans(receiver, lambda s: s["attributes"].get("http.response.status_code") == 429)
    assert refused[0]["name"] == "GET /api/v1/identities/"
    streams = wait_for_spans(receiver, lambda s: s["attributes"].get("http.route") == "/sse/environments/{key}/stream")
    assert streams[0]["name"] == "GET /sse/environments/{key}/stream"
    # the leader: a client span per document fetch, its traceparent sent upstream
    fetches = wait_for_spans(receiver, lambda s: s["name"] == "GET environment-document")
    fetch = fetches[0]
    assert fetch["kind"] == SPAN_KIND_CLIENT and fetch["resource"]["edge_proxy.role"] == "leader"
    assert fetch["attributes"]["http.response.status_code"] == 200
    assert fetch["attributes"]["flagsmith.environment.id"] in (1, 2)
    sent = [request["traceparent"].split("-")[1:3] for request in upstream.requests if request["traceparent"]]
    assert [fetch["trace_id"], fetch["span_id"]] in sent
    # never a key, anywhere in what was exported
    proxy.stop()
    for secret in (*KEYS, *KEYS.values()):
        assert not any(secret.encode() in body for body in receiver.raw), secret


def wait_for_spans(receiver: OtlpReceiver, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    assert wait_for(lambda: bool(receiver.find(predicate)), 15), receiver.spans
    return receiver.find(predicate)


def test_traces_are_off_without_otel_settings_and_nothing_is_imported() -> None:
    """Off by default: the request path pays one attribute test and OpenTelemetry is never imported."""
    code = """
import sys
from proxy.http.app import ProxyApp
from proxy.worker.store import Store
from tests.inprocess import settings_for
settings = settings_for()
app = ProxyApp(settings, Store(settings))
assert app.controls.active is False and app.controls.tracing is None
assert not [name for name in sys.modules if name.startswith("opentelemetry")], "opentelemetry imported"
"""
    env = {"PATH": "/usr/bin:/bin", "OTEL_SERVICE_NAME": "x"}  # a name alone does not turn traces on
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
