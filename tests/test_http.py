"""HTTP behaviour beyond the captures: bad requests, gzip, CORS, HEAD, caching headers, metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ProxyProcess, conformance_documents, proxy_config, serving, wait_for

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


def test_body_too_large_is_413(proxy: ProxyProcess) -> None:
    body = json.dumps({"identifier": "x", "traits": [{"trait_key": "k", "trait_value": "v" * 1900}] * 3}).encode()
    response = post(proxy, body)
    assert response.status_code == 413
    assert response.json() == {"status": "payload_too_large", "message": "request body exceeds 4096 bytes"}


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


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"[1, 2]", ("model_attributes_type", ["body"])),
        (b'{"identifier": "x", "traits": {"a": 1}}', ("list_type", ["body", "traits"])),
        (b'{"identifier": "x", "traits": [{"trait_value": 1}]}', ("missing", ["body", "traits", 0, "trait_key"])),
        (b'{"identifier": "x", "traits": [{"trait_key": 5}]}', ("string_type", ["body", "traits", 0, "trait_key"])),
        (b'{"identifier": "x", "traits": ["plan"]}', ("model_attributes_type", ["body", "traits", 0])),
        (b'{"identifier": null}', ("string_type", ["body", "identifier"])),
        (b"", ("json_invalid", ["body", 0])),
    ],
)
def test_bad_bodies_get_422_naming_the_field(proxy: ProxyProcess, body: bytes, error: tuple[str, list]) -> None:
    response = post(proxy, body)
    assert response.status_code == 422
    first = response.json()["detail"][0]
    assert (first["type"], first["loc"]) == error
    assert first["msg"]


def test_text_content_type_is_422(proxy: ProxyProcess) -> None:
    response = post(proxy, b'{"identifier": "x"}', {"Content-Type": "text/plain"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "model_attributes_type"


def test_json_variants_are_accepted(proxy: ProxyProcess) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        assert post(proxy, b'{"identifier": "x"}', {"Content-Type": content_type}).status_code == 200


def test_identity_response_gzip_and_cache(proxy: ProxyProcess) -> None:
    body = json.dumps({"identifier": "gz-user", "traits": [{"trait_key": "plan", "trait_value": "premium"}]}).encode()
    plain = post(proxy, body)
    zipped = httpx.post(
        proxy.url + "/api/v1/identities/",
        content=body,
        headers={**CLIENT, "Content-Type": "application/json", "Accept-Encoding": "gzip"},
    )
    assert plain.status_code == zipped.status_code == 200
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.json() == plain.json()  # httpx decoded it
    assert plain.headers["vary"] == "Accept-Encoding"
    assert post(proxy, body).content == plain.content
    metrics = proxy.get("/metrics").text
    assert re.search(r'^edge_proxy_identity_cache_total\{result="hit"\} [1-9]', metrics, re.M), metrics
    assert "x-flagsmith-document-updated-at" in plain.headers


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


def test_unknown_feature_and_route(proxy: ProxyProcess) -> None:
    missing = proxy.get("/api/v1/flags/?feature=nope", headers=CLIENT)
    assert missing.status_code == 404
    assert missing.json() == {"status": "not_found", "message": "feature 'nope' not found"}
    assert proxy.get("/nothing/here").json() == {"detail": "Not Found"}
    assert httpx.delete(proxy.url + "/api/v1/identities/").headers["allow"] == "GET, HEAD, POST"


def test_odd_input_never_gets_a_traceback(proxy: ProxyProcess) -> None:
    odd = [
        ("GET", "/api/v1/identities/?identifier=%ff%fe", None),
        ("GET", "/api/v1/flags/?feature=%00", None),
        ("POST", "/api/v1/identities/", b'{"identifier": "\\ud800"}'),
        ("POST", "/api/v1/identities/", b"\xff\xfe"),
        ("POST", "/api/v1/identities/", b'{"identifier": "x", "traits": [{"trait_key": "n", "trait_value": 1e400}]}'),
    ]
    for method, path, content in odd:
        response = httpx.request(method, proxy.url + path, content=content, headers=CLIENT)
        assert response.status_code in (200, 404, 422), (path, response.status_code, response.text)
        assert "Traceback" not in response.text
    assert "Traceback" not in proxy.log()


def test_metrics_count_requests(proxy: ProxyProcess) -> None:
    for _ in range(3):
        proxy.get("/api/v1/flags/", headers=CLIENT)
    text = proxy.get("/metrics").text
    labels = r'method="GET",response_status="200",route="/api/v1/flags/"'
    match = re.search(rf"^flagsmith_http_server_requests_total\{{{labels}\}} ([0-9.]+)$", text, re.M)
    assert match and float(match.group(1)) >= 3
    assert 'edge_proxy_upstream_fetches_total{outcome="ok"}' in text
    # environments by the document's id and name, never by a key
    labels = 'environment_id="1",environment_name="Development"'
    assert f"edge_proxy_environment_last_success_timestamp_seconds{{{labels}}}" in text
    assert "env_client_key" not in text and "en…_1" not in text


def test_analytics_are_validated(proxy: ProxyProcess) -> None:
    url = proxy.url + "/api/v1/analytics/flags/"
    assert httpx.post(url, json={"show_banner": 2}, headers=CLIENT).status_code == 200
    assert httpx.post(url, json={"show_banner": 2}, headers={"X-Environment-Key": "nope"}).status_code == 401
    bad = httpx.post(url, json={"show_banner": "many"}, headers=CLIENT)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "show_banner"]
    assert httpx.post(url, json=[1], headers=CLIENT).status_code == 422


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
