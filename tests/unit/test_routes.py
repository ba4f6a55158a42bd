"""Route behaviour in process (tests/inprocess.py): the real app and Store, BlackSheep's TestClient, no sockets.

Bad requests, body caps, gzip, CORS, conditional GET, 404/405, identity cache, analytics validation,
health rules, hot swaps. The same routes through real Granian processes: tests/system/test_http.py,
tests/system/test_conformance.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import orjson
import pytest

from proxy.area.bodies import KeyKind
from tests.inprocess import InProcessProxy, settings_for
from tests.support import conformance_documents

CLIENT = {"X-Environment-Key": "env_client_key_1"}
SERVER = {"X-Environment-Key": "ser.env_server_key_1"}
GOOD_ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def proxy() -> Iterator[InProcessProxy]:
    app = InProcessProxy(
        settings_for(allow_origins=[GOOD_ORIGIN], max_request_body_bytes=4096), conformance_documents()
    )
    yield app
    app.close()


def identity(proxy: InProcessProxy, body: bytes, headers: dict[str, str] | None = None, **kwargs: str):
    return proxy.post("/api/v1/identities/", body, {**CLIENT, **(headers or {})}, **kwargs)


def test_flags_for_client_and_server_keys(proxy: InProcessProxy) -> None:
    client = proxy.get("/api/v1/flags/", CLIENT)
    assert client.status == 200 and client.headers["content-type"] == "application/json"
    assert client.raw == proxy.state("env_client_key_1").flags(KeyKind.CLIENT).plain  # the pre-encoded bytes
    names = {flag["feature"]["name"] for flag in client.json()}
    assert names and names <= {flag["feature"]["name"] for flag in proxy.get("/api/v1/flags/", SERVER).json()}
    assert proxy.get("/api/v1/flags", CLIENT).raw == client.raw  # without the trailing slash, no redirect


def test_missing_and_unknown_keys_are_401(proxy: InProcessProxy) -> None:
    missing = proxy.get("/api/v1/flags/")
    assert (missing.status, missing.json()) == (401, {"status": "unauthorized", "message": "unknown key ''"})
    unknown = proxy.get("/api/v1/flags/", {"X-Environment-Key": "nope"})
    assert (unknown.status, unknown.json()["message"]) == (401, "unknown key 'nope'")


def test_a_known_key_without_a_document_is_503() -> None:
    app = InProcessProxy(settings_for(), {"ser.env_server_key_1": conformance_documents()["ser.env_server_key_1"]})
    try:
        answer = app.get("/api/v1/flags/", {"X-Environment-Key": "env_client_key_2"})
        assert answer.status == 503 and answer.json()["status"] == "service_unavailable"
        assert app.get("/api/v1/flags/", CLIENT).status == 200
        health = app.get("/proxy/health")
        assert health.status == 503 and health.json()["reason"] == "environment document(s) not updated."
    finally:
        app.close()


def test_body_too_large_is_413(proxy: InProcessProxy) -> None:
    body = json.dumps({"identifier": "x", "traits": [{"trait_key": "k", "trait_value": "v" * 1900}] * 3}).encode()
    answer = identity(proxy, body)
    assert answer.status == 413
    assert answer.json() == {"status": "payload_too_large", "message": "request body exceeds 4096 bytes"}


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
def test_bad_bodies_get_422_naming_the_field(proxy: InProcessProxy, body: bytes, error: tuple[str, list]) -> None:
    answer = identity(proxy, body)
    assert answer.status == 422
    first = answer.json()["detail"][0]
    assert (first["type"], first["loc"]) == error
    assert first["msg"]


def test_content_types(proxy: InProcessProxy) -> None:
    text = identity(proxy, b'{"identifier": "x"}', content_type="text/plain")
    assert text.status == 422 and text.json()["detail"][0]["type"] == "model_attributes_type"
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json", None):
        assert identity(proxy, b'{"identifier": "x"}', content_type=content_type).status == 200


def test_identity_response_gzip_and_cache(proxy: InProcessProxy) -> None:
    body = json.dumps({"identifier": "gz-user", "traits": [{"trait_key": "plan", "trait_value": "premium"}]}).encode()
    cache = proxy.store.cache
    assert cache is not None
    plain = identity(proxy, body)
    hits = cache.hits
    zipped = identity(proxy, body, {"Accept-Encoding": "gzip"})
    assert plain.status == zipped.status == 200
    assert zipped.headers["content-encoding"] == "gzip" and zipped.content == plain.raw
    assert plain.headers["vary"] == "Accept-Encoding"
    assert identity(proxy, body).raw == plain.raw
    assert cache.hits == hits + 2  # the gzip answer and the repeat came from the cache
    assert "x-flagsmith-document-updated-at" in plain.headers
    echoed = plain.json()
    assert echoed["identifier"] == "gz-user" and echoed["traits"] == [{"trait_key": "plan", "trait_value": "premium"}]


def test_identity_get(proxy: InProcessProxy) -> None:
    answer = proxy.get("/api/v1/identities/?identifier=someone", CLIENT)
    assert answer.status == 200 and answer.json()["identifier"] == "someone"
    missing = proxy.get("/api/v1/identities/", CLIENT)
    assert missing.status == 422 and missing.json()["detail"][0]["loc"] == ["query", "identifier"]


def test_cors(proxy: InProcessProxy) -> None:
    allowed = proxy.get("/api/v1/flags/", {**CLIENT, "Origin": GOOD_ORIGIN})
    assert allowed.headers["access-control-allow-origin"] == GOOD_ORIGIN
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "x-flagsmith-document-updated-at" in allowed.headers["access-control-expose-headers"]
    assert allowed.headers["vary"] == "Accept-Encoding, Origin"  # one merged Vary
    other = proxy.get("/api/v1/flags/", {**CLIENT, "Origin": "https://evil.example"})
    assert other.status == 200 and "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in proxy.get("/api/v1/flags/", CLIENT).headers
    preflight = proxy.request(
        "OPTIONS",
        "/api/v1/identities/",
        {
            "Origin": GOOD_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-environment-key,content-type",
        },
    )
    assert preflight.status == 200 and preflight.text == "OK"
    assert preflight.headers["access-control-allow-headers"] == "x-environment-key,content-type"
    assert preflight.headers["access-control-max-age"] == "600"
    error = proxy.get("/api/v1/flags/", {"X-Environment-Key": "nope", "Origin": GOOD_ORIGIN})
    assert error.status == 401 and error.headers["access-control-allow-origin"] == GOOD_ORIGIN


def test_environment_document_conditional_get(proxy: InProcessProxy) -> None:
    answer = proxy.get("/api/v1/environment-document/", SERVER)
    assert answer.status == 200
    assert answer.headers["last-modified"] == "Wed, 01 May 2024 12:00:00 GMT"
    assert answer.headers["x-flagsmith-document-updated-at"] == "1714564800.0"
    again = proxy.get("/api/v1/environment-document/", {**SERVER, "If-Modified-Since": answer.headers["last-modified"]})
    assert again.status == 304 and again.raw == b""
    older = proxy.get("/api/v1/environment-document/", {**SERVER, "If-Modified-Since": "Tue, 30 Apr 2024 12:00:00 GMT"})
    assert older.status == 200
    garbage = proxy.get("/api/v1/environment-document/", {**SERVER, "If-Modified-Since": "yesterday"})
    assert garbage.status == 200
    gzipped = proxy.get("/api/v1/environment-document/", {**SERVER, "Accept-Encoding": "gzip"})
    assert gzipped.headers["content-encoding"] == "gzip" and orjson.loads(gzipped.content) == answer.json()
    assert proxy.get("/api/v1/environment-document/", CLIENT).status == 401  # server keys only


def test_environment_document_etag(proxy: InProcessProxy) -> None:
    document = proxy.get("/api/v1/environment-document/", SERVER)
    etag = document.headers["etag"]
    state = proxy.state("env_client_key_1")
    assert etag == f'"{hashlib.sha256(state.document.plain).hexdigest()[:32]}"'  # a hash of the bytes served
    assert etag.encode() == state.etag  # computed once with the state, not per request

    def get(**headers: str):
        return proxy.get("/api/v1/environment-document/", {**SERVER, **headers})

    again = get(**{"If-None-Match": etag})
    assert again.status == 304 and again.raw == b""
    assert again.headers["etag"] == etag and again.headers["last-modified"] == document.headers["last-modified"]
    assert again.headers["vary"] == "Accept-Encoding"
    assert get(**{"If-None-Match": f'"other", W/{etag}'}).status == 304  # a list, and weak comparison
    assert get(**{"If-None-Match": "*"}).status == 304
    assert get(**{"If-None-Match": '"other"'}).status == 200
    assert get(**{"If-None-Match": "garbage"}).status == 200
    # If-None-Match decides alone (RFC 9110 13.2.2): a date that would answer 304 does not, and vice versa
    changed = get(**{"If-None-Match": '"other"', "If-Modified-Since": document.headers["last-modified"]})
    assert changed.status == 200 and changed.headers["etag"] == etag
    assert get(**{"If-None-Match": etag, "If-Modified-Since": "Tue, 30 Apr 2024 12:00:00 GMT"}).status == 304
    # the gzip representation has its own strong validator
    gzipped = get(**{"Accept-Encoding": "gzip"})
    assert gzipped.headers["content-encoding"] == "gzip"
    gzip_etag = gzipped.headers["etag"]
    assert gzip_etag != etag and gzip_etag.startswith(etag[:-1])
    assert get(**{"Accept-Encoding": "gzip", "If-None-Match": gzip_etag}).status == 304
    assert get(**{"Accept-Encoding": "gzip", "If-None-Match": etag}).status == 200
    assert get(**{"If-None-Match": gzip_etag}).status == 200


def test_unknown_feature_route_and_method(proxy: InProcessProxy) -> None:
    missing = proxy.get("/api/v1/flags/?feature=nope", CLIENT)
    assert missing.status == 404
    assert missing.json() == {"status": "not_found", "message": "feature 'nope' not found"}
    assert proxy.get("/api/v1/flags/?feature=show_banner", CLIENT).json()["feature"]["name"] == "show_banner"
    nothing = proxy.get("/nothing/here")
    assert (nothing.status, nothing.json()) == (404, {"detail": "Not Found"})
    wrong = proxy.request("DELETE", "/api/v1/identities/")
    assert wrong.status == 405 and wrong.headers["allow"] == "GET, HEAD, POST"
    assert wrong.json() == {"detail": "Method Not Allowed"}
    assert proxy.request("PUT", "/ofrep/v1/evaluate/flags/some_flag").headers["allow"] == "POST"


def test_odd_input_never_gets_a_traceback(proxy: InProcessProxy) -> None:
    odd = [
        ("GET", "/api/v1/identities/?identifier=%ff%fe", None),
        ("GET", "/api/v1/flags/?feature=%00", None),
        ("POST", "/api/v1/identities/", b'{"identifier": "\\ud800"}'),
        ("POST", "/api/v1/identities/", b"\xff\xfe"),
        ("POST", "/api/v1/identities/", b'{"identifier": "x", "traits": [{"trait_key": "n", "trait_value": 1e400}]}'),
    ]
    for method, path, content in odd:
        answer = proxy.request(method, path, CLIENT, content)
        assert answer.status in (200, 404, 422), (path, answer.status, answer.text)
        assert "Traceback" not in answer.text and answer.json()


def test_analytics_are_validated(proxy: InProcessProxy) -> None:
    url = "/api/v1/analytics/flags/"
    assert proxy.post(url, b'{"show_banner": 2}', CLIENT).status == 200
    assert proxy.post(url, b'{"show_banner": 2}', {"X-Environment-Key": "nope"}).status == 401
    bad = proxy.post(url, b'{"show_banner": "many"}', CLIENT)
    assert bad.status == 422 and bad.json()["detail"][0]["loc"] == ["body", "show_banner"]
    assert proxy.post(url, b"[1]", CLIENT).status == 422
    assert proxy.store.counters.analytics.counts["env_client_key_1"]["show_banner"] >= 2


def test_health_and_liveness(proxy: InProcessProxy) -> None:
    health = proxy.get("/proxy/health")
    assert health.status == 200 and health.json()["status"] == "ok"
    assert health.json()["last_successful_update"].endswith("Z")
    assert int(health.headers["x-edge-proxy-generation"]) == proxy.store.generation
    for path in ("/health", "/proxy/health/readiness"):
        assert proxy.get(path).raw == health.raw
    assert proxy.get("/proxy/health/liveness").status == 200


def test_stale_environments_fail_readiness_and_are_named() -> None:
    documents = conformance_documents()
    app = InProcessProxy(settings_for(api_poll_frequency_seconds=10), documents)
    try:
        current = {
            key: orjson.dumps(doc)
            for key, doc in zip(("env_client_key_1", "env_client_key_2"), documents.values(), strict=True)
        }
        app.publish(current, last_success=0.0)  # a good answer long ago
        health = app.get("/proxy/health")
        assert health.status == 503 and health.json()["reason"] == "environment document(s) stale."
        assert {entry["key"] for entry in health.json()["environments"]["stale"]} == {"en…_1", "en…_2"}
    finally:
        app.close()


def test_a_new_generation_is_served_at_once_and_drops_cached_identities(proxy: InProcessProxy) -> None:
    documents = conformance_documents()
    body = b'{"identifier": "swap-user"}'
    before = identity(proxy, body).json()
    document = documents["ser.env_server_key_1"]
    for state in document["feature_states"]:
        state["enabled"] = not state["enabled"]
    try:
        proxy.publish({"env_client_key_1": orjson.dumps(document)})
        after = identity(proxy, body).json()
        assert [f["enabled"] for f in after["flags"]] == [not f["enabled"] for f in before["flags"]]
    finally:
        proxy.publish({"env_client_key_1": orjson.dumps(conformance_documents()["ser.env_server_key_1"])})
    assert identity(proxy, body).json() == before
