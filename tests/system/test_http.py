"""HTTP behaviour that needs real Granian processes: chunked bodies, HEAD, CORS and 304 through the server,
multiprocess metrics, logs. Route behaviour (bad requests, gzip, CORS rules, 404/405, caching) is tested in
process, in milliseconds: tests/unit/test_routes.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import ProxyProcess, conformance_documents, proxy_config, serving, wait_for

CLIENT = {"X-Environment-Key": "env_client_key_1", "Accept-Encoding": "identity"}
SERVER = {"X-Environment-Key": "ser.env_server_key_1", "Accept-Encoding": "identity"}
GOOD_ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    def config(api_url: str) -> dict[str, Any]:
        return proxy_config(api_url, allow_origins=[GOOD_ORIGIN], max_request_body_bytes=4096)

    with serving(tmp_path_factory.mktemp("http"), conformance_documents(), config) as proxy:
        yield proxy


def post(proxy: ProxyProcess, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        proxy.url + "/api/v1/identities/",
        content=content,
        headers={**CLIENT, "Content-Type": "application/json", **(headers or {})},
        timeout=10,
    )


def test_chunked_body_too_large_is_413(proxy: ProxyProcess) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"identifier":"x","pad":"'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    response = httpx.post(
        proxy.url + "/api/v1/identities/", content=chunks(), headers={**CLIENT, "Content-Type": "application/json"}
    )
    assert response.status_code == 413


def test_cors(proxy: ProxyProcess) -> None:
    allowed = proxy.get("/api/v1/flags/", headers={**CLIENT, "Origin": GOOD_ORIGIN})
    assert allowed.headers["access-control-allow-origin"] == GOOD_ORIGIN
    assert allowed.headers["vary"] == "Accept-Encoding, Origin"  # one merged Vary
    other = proxy.get("/api/v1/flags/", headers={**CLIENT, "Origin": "https://evil.example"})
    assert other.status_code == 200
    assert "access-control-allow-origin" not in other.headers
    without = proxy.get("/api/v1/flags/", headers=CLIENT)
    assert "access-control-allow-origin" not in without.headers
    preflight = httpx.options(
        proxy.url + "/api/v1/identities/",
        headers={
            "Origin": GOOD_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-environment-key,content-type",
        },
    )
    assert preflight.status_code == 200 and preflight.text == "OK"
    assert preflight.headers["access-control-allow-headers"] == "x-environment-key,content-type"
    assert preflight.headers["access-control-max-age"] == "600"
    error = proxy.get("/api/v1/flags/", headers={"X-Environment-Key": "nope", "Origin": GOOD_ORIGIN})
    assert error.status_code == 401 and error.headers["access-control-allow-origin"] == GOOD_ORIGIN


def test_head_serves_headers_only(proxy: ProxyProcess) -> None:
    response = httpx.head(proxy.url + "/api/v1/flags/", headers=CLIENT)
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-type"] == "application/json"


def test_environment_document_conditional_get(proxy: ProxyProcess) -> None:
    response = proxy.get("/api/v1/environment-document/", headers=SERVER)
    assert response.status_code == 200
    assert response.headers["last-modified"] == "Wed, 01 May 2024 12:00:00 GMT"
    assert response.headers["x-flagsmith-document-updated-at"] == "1714564800.0"
    again = proxy.get(
        "/api/v1/environment-document/", headers={**SERVER, "If-Modified-Since": response.headers["last-modified"]}
    )
    assert again.status_code == 304 and again.content == b""
    gzipped = proxy.get("/api/v1/environment-document/", headers={**SERVER, "Accept-Encoding": "gzip"})
    assert gzipped.headers["content-encoding"] == "gzip"
    assert json.loads(gzipped.content) == response.json()  # httpx decompressed it


@pytest.mark.parametrize(
    ("accept", "encoding"),
    [("gzip;q=0.5", "gzip"), ("gzip; q=0.8", "gzip"), ("GZIP;q=0", None), ("gzip;q=0.5, identity", None)],
)
def test_accept_encoding_weights_are_read_as_rfc_9110_says(
    proxy: ProxyProcess, accept: str, encoding: str | None
) -> None:
    """Before: `gzip;q=0.5` and `gzip; q=0.8` got the plain body, `GZIP;q=0` the gzip one."""
    response = proxy.get("/api/v1/environment-document/", headers={**SERVER, "Accept-Encoding": accept})
    assert response.status_code == 200
    assert response.headers.get("content-encoding") == encoding
    assert response.json()["api_key"] == "env_client_key_1"


def test_metrics_count_requests(proxy: ProxyProcess) -> None:
    for _ in range(3):
        proxy.get("/api/v1/flags/", headers=CLIENT)
        post(proxy, b'{"identifier": "metrics-user"}')
    text = proxy.get("/metrics").text
    assert re.search(r'^edge_proxy_identity_cache_total\{result="hit"\} [1-9]', text, re.M), text
    labels = r'method="GET",response_status="200",route="/api/v1/flags/"'
    match = re.search(rf"^flagsmith_http_server_requests_total\{{{labels}\}} ([0-9.]+)$", text, re.M)
    assert match and float(match.group(1)) >= 3
    assert 'edge_proxy_upstream_fetches_total{outcome="ok"}' in text
    # environments by the document's id and name, never by a key
    labels = 'environment_id="1",environment_name="Development"'
    assert f"edge_proxy_environment_last_success_timestamp_seconds{{{labels}}}" in text
    assert "env_client_key" not in text and "en…_1" not in text


def test_json_logs_and_access_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    def config(api_url: str) -> dict[str, Any]:
        return proxy_config(api_url, logging={"log_format": "json", "enable_access_log": True})

    with serving(tmp_path_factory.mktemp("logs"), conformance_documents(), config) as proxy:
        proxy.get("/api/v1/flags/", headers=CLIENT)
        assert wait_for(lambda: "/api/v1/flags/" in proxy.log(), 10), proxy.log()
        lines = [line for line in proxy.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"timestamp", "level", "logger", "message"} <= entry.keys() for entry in entries)
    assert any(entry["logger"] == "granian.access" and "/api/v1/flags/" in entry["message"] for entry in entries)
    assert not any("env_server_key" in line for line in lines)  # keys are masked in logs
