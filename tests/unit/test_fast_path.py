"""The fast path (proxy/http/fast_path.py) answers exactly as BlackSheep does: status, headers (names, values
and order) and body, for every request, the hot routes' errors and edge cases included.

Two in-process proxies on the same documents, one with `server.fast_path` on, one with it off, get the same
raw ASGI calls (tests/asgi.py); what each sends back is compared whole.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from proxy.config.sections import ServerSettings
from proxy.http.app import build_asgi
from proxy.http.fast_path import FastPath
from tests.asgi import DISCONNECT, STALL, Sent, call
from tests.inprocess import InProcessProxy, settings_for
from tests.support import conformance_documents

CLIENT = (b"x-environment-key", b"env_client_key_1")
SERVER = (b"x-environment-key", b"ser.env_server_key_1")
MISSING = (b"x-environment-key", b"env_client_key_2")  # a known key whose document is not loaded: 503
JSON = (b"content-type", b"application/json")
GZIP = (b"accept-encoding", b"gzip, deflate")
ORIGIN = (b"origin", b"https://app.example.com")
OTHER_ORIGIN = (b"origin", b"https://elsewhere.example.com")
IDENTITY = (
    b'{"identifier":"u1","traits":[{"trait_key":"age","trait_value":30},{"trait_key":"beta","trait_value":true}]}'
)
CONTEXT = b'{"context":{"targetingKey":"u1","age":30,"beta":true}}'
LONG = "x" * 2100

Case = tuple[str, bytes, list[tuple[bytes, bytes]], Any]  # method, target, headers, body (bytes or chunks)

CASES: dict[str, Case] = {
    # flags
    "flags": ("GET", b"/api/v1/flags/", [CLIENT], b""),
    "flags without the slash": ("GET", b"/api/v1/flags", [CLIENT], b""),
    "flags, server key": ("GET", b"/api/v1/flags/", [SERVER], b""),
    "flags, gzip": ("GET", b"/api/v1/flags/", [CLIENT, GZIP], b""),
    "flags, gzip refused": ("GET", b"/api/v1/flags/", [CLIENT, (b"accept-encoding", b"gzip;q=0")], b""),
    "flags, HEAD": ("HEAD", b"/api/v1/flags/", [CLIENT, GZIP], b""),
    "flags, CORS": ("GET", b"/api/v1/flags/", [CLIENT, GZIP, ORIGIN], b""),
    "flags, unlisted origin": ("GET", b"/api/v1/flags/", [CLIENT, OTHER_ORIGIN], b""),
    "flags, no key": ("GET", b"/api/v1/flags/", [], b""),
    "flags, unknown key": ("GET", b"/api/v1/flags/", [(b"x-environment-key", b"nope")], b""),
    "flags, no key, CORS": ("GET", b"/api/v1/flags/", [ORIGIN], b""),
    "flags, not loaded": ("GET", b"/api/v1/flags/", [MISSING], b""),
    "one flag": ("GET", b"/api/v1/flags/?feature=banner_text", [CLIENT], b""),
    "one flag, server-only from a client key": ("GET", b"/api/v1/flags/?feature=secret_server_flag", [CLIENT], b""),
    "one flag, unknown": ("GET", b"/api/v1/flags/?feature=nope", [CLIENT], b""),
    "one flag, blank": ("GET", b"/api/v1/flags/?feature=", [CLIENT], b""),
    "one flag, odd query": ("GET", b"/api/v1/flags/?feature=%ZZ&feature=max%5Fitems", [CLIENT], b""),
    "flags, other casing": ("GET", b"/API/v1/Flags/", [CLIENT], b""),
    "flags, escaped path": ("GET", b"/api/v1/%66lags/", [CLIENT], b""),
    "flags, PUT": ("PUT", b"/api/v1/flags/", [CLIENT], b"{}"),
    "flags, POST": ("POST", b"/api/v1/flags", [CLIENT, JSON], b"{}"),
    "flags, preflight": (
        "OPTIONS",
        b"/api/v1/flags/",
        [ORIGIN, (b"access-control-request-method", b"GET"), (b"access-control-request-headers", b"x-environment-key")],
        b"",
    ),
    # identities, GET
    "identity GET": ("GET", b"/api/v1/identities/?identifier=u1", [CLIENT], b""),
    "identity GET, gzip, no slash": ("GET", b"/api/v1/identities?identifier=u1", [CLIENT, GZIP], b""),
    "identity GET, HEAD": ("HEAD", b"/api/v1/identities/?identifier=u1", [CLIENT], b""),
    "identity GET, no identifier": ("GET", b"/api/v1/identities/", [CLIENT], b""),
    "identity GET, long identifier": ("GET", b"/api/v1/identities/?identifier=" + LONG.encode(), [CLIENT], b""),
    "identity GET, no key": ("GET", b"/api/v1/identities/?identifier=u1", [], b""),
    # identities, POST
    "identity POST": ("POST", b"/api/v1/identities/", [CLIENT, JSON], IDENTITY),
    "identity POST, again": ("POST", b"/api/v1/identities/", [CLIENT, JSON], IDENTITY),
    "identity POST, gzip": ("POST", b"/api/v1/identities/", [CLIENT, JSON, GZIP], IDENTITY),
    "identity POST, CORS": ("POST", b"/api/v1/identities", [CLIENT, JSON, GZIP, ORIGIN], IDENTITY),
    "identity POST, server key": ("POST", b"/api/v1/identities/", [SERVER, JSON], IDENTITY),
    "identity POST, respelled": (
        "POST",
        b"/api/v1/identities/",
        [CLIENT, JSON],
        b'{"traits": [{"trait_value": 30, "trait_key": "age"}, {"trait_key": "beta", "trait_value": true}],'
        b' "identifier": "u1"}',
    ),
    "identity POST, 1 for True": (
        "POST",
        b"/api/v1/identities/",
        [CLIENT, JSON],
        b'{"identifier":"u1","traits":[{"trait_key":"age","trait_value":30},{"trait_key":"beta","trait_value":1}]}',
    ),
    "identity POST, in chunks": ("POST", b"/api/v1/identities/", [CLIENT, JSON], [IDENTITY[:10], IDENTITY[10:]]),
    "identity POST, no content type": ("POST", b"/api/v1/identities/", [CLIENT], IDENTITY),
    "identity POST, text": ("POST", b"/api/v1/identities/", [CLIENT, (b"content-type", b"text/plain")], IDENTITY),
    "identity POST, bad JSON": ("POST", b"/api/v1/identities/", [CLIENT, JSON], b'{"identifier": '),
    "identity POST, empty": ("POST", b"/api/v1/identities/", [CLIENT, JSON], b""),
    "identity POST, a list": ("POST", b"/api/v1/identities/", [CLIENT, JSON], b"[1, 2]"),
    "identity POST, bad traits": (
        "POST",
        b"/api/v1/identities/",
        [CLIENT, JSON],
        b'{"identifier": 5, "traits": [{"trait_value": [1]}, "x", {"trait_key": "k", "trait_value": {"a": 1}}]}',
    ),
    "identity POST, unevaluable trait": (
        "POST",
        b"/api/v1/identities/",
        [CLIENT, JSON],
        b'{"identifier": "u", "traits": [{"trait_key": "user_id", "trait_value": "' + b"9" * 320 + b'"}]}',
    ),
    "identity POST, too large (declared)": (
        "POST",
        b"/api/v1/identities/",
        [CLIENT, JSON, (b"content-length", b"5000")],
        b"{" + b" " * 4999,
    ),
    "identity POST, too large (chunked)": ("POST", b"/api/v1/identities/", [CLIENT, JSON], [b" " * 3000] * 2),
    "identity POST, client gone": ("POST", b"/api/v1/identities/", [CLIENT, JSON], [b"{", DISCONNECT]),
    "identity POST, no key": ("POST", b"/api/v1/identities/", [JSON], IDENTITY),
    "identity POST, not loaded": ("POST", b"/api/v1/identities/", [MISSING, JSON], IDENTITY),
    "identities, DELETE": ("DELETE", b"/api/v1/identities/", [CLIENT], b""),
    # environment document
    "document": ("GET", b"/api/v1/environment-document/", [SERVER], b""),
    "document, gzip, no slash": ("GET", b"/api/v1/environment-document", [SERVER, GZIP, ORIGIN], b""),
    "document, client key": ("GET", b"/api/v1/environment-document/", [CLIENT], b""),
    "document, not modified": (
        "GET",
        b"/api/v1/environment-document/",
        [SERVER, (b"if-modified-since", b"Sat, 01 Jan 2050 00:00:00 GMT")],
        b"",
    ),
    "document, modified since": (
        "GET",
        b"/api/v1/environment-document/",
        [SERVER, (b"if-modified-since", b"Sat, 01 Jan 2000 00:00:00 GMT")],
        b"",
    ),
    "document, bad date": ("GET", b"/api/v1/environment-document/", [SERVER, (b"if-modified-since", b"soon")], b""),
    "document, any etag": ("GET", b"/api/v1/environment-document/", [SERVER, GZIP, (b"if-none-match", b"*")], b""),
    "document, other etag": ("GET", b"/api/v1/environment-document/", [SERVER, (b"if-none-match", b'"x"')], b""),
    # OFREP
    "ofrep flag": ("POST", b"/ofrep/v1/evaluate/flags/max_items", [CLIENT, JSON], CONTEXT),
    "ofrep flag, slash": ("POST", b"/ofrep/v1/evaluate/flags/max_items/", [CLIENT, JSON, ORIGIN], CONTEXT),
    "ofrep flag, escaped key": ("POST", b"/ofrep/v1/evaluate/flags/max%5Fitems", [CLIENT, JSON], CONTEXT),
    "ofrep flag, not UTF-8": ("POST", b"/ofrep/v1/evaluate/flags/%FF", [CLIENT, JSON], CONTEXT),
    "ofrep flag, two segments": ("POST", b"/ofrep/v1/evaluate/flags/a/b", [CLIENT, JSON], CONTEXT),
    "ofrep flag, unknown": ("POST", b"/ofrep/v1/evaluate/flags/nope", [CLIENT, JSON], CONTEXT),
    "ofrep flag, bearer": (
        "POST",
        b"/ofrep/v1/evaluate/flags/max_items",
        [(b"authorization", b"Bearer env_client_key_1")],
        b"{}",
    ),
    "ofrep flag, X-API-Key": (
        "POST",
        b"/ofrep/v1/evaluate/flags/max_items",
        [(b"x-api-key", b"env_client_key_1")],
        b"{}",
    ),
    "ofrep flag, no key": ("POST", b"/ofrep/v1/evaluate/flags/max_items", [JSON], CONTEXT),
    "ofrep flag, empty body": ("POST", b"/ofrep/v1/evaluate/flags/max_items", [CLIENT], b""),
    "ofrep flag, bad JSON": ("POST", b"/ofrep/v1/evaluate/flags/max_items", [CLIENT], b"{"),
    "ofrep flag, traits, no key": (
        "POST",
        b"/ofrep/v1/evaluate/flags/max_items",
        [CLIENT],
        b'{"context": {"plan": "x"}}',
    ),
    "ofrep flag, unevaluable": (
        "POST",
        b"/ofrep/v1/evaluate/flags/max_items",
        [CLIENT],
        b'{"context": {"targetingKey": "u", "user_id": "' + b"9" * 320 + b'"}}',
    ),
    "ofrep flag, too large": ("POST", b"/ofrep/v1/evaluate/flags/max_items", [CLIENT], [b" " * 3000] * 2),
    "ofrep flag, GET": ("GET", b"/ofrep/v1/evaluate/flags/max_items", [CLIENT], b""),
    "ofrep flags": ("POST", b"/ofrep/v1/evaluate/flags", [CLIENT, JSON], CONTEXT),
    "ofrep flags, slash, gzip": ("POST", b"/ofrep/v1/evaluate/flags/", [CLIENT, JSON, GZIP, ORIGIN], CONTEXT),
    "ofrep flags, environment": ("POST", b"/ofrep/v1/evaluate/flags", [SERVER], b'{"context": {}}'),
    "ofrep flags, if-none-match": (
        "POST",
        b"/ofrep/v1/evaluate/flags",
        [CLIENT, (b"if-none-match", b"*")],
        CONTEXT,
    ),
    "ofrep flags, not loaded": ("POST", b"/ofrep/v1/evaluate/flags", [MISSING], CONTEXT),
    # not hot: handed to BlackSheep whole
    "health": ("GET", b"/proxy/health", [ORIGIN], b""),
    "analytics": ("POST", b"/api/v1/analytics/flags/", [CLIENT, JSON], b'{"max_items": 2}'),
    "not found": ("GET", b"/nothing/here", [CLIENT, ORIGIN], b""),
}


def documents() -> dict[str, Any]:
    return {"ser.env_server_key_1": conformance_documents()["ser.env_server_key_1"]}  # env 2 never loads


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[InProcessProxy, InProcessProxy]]:
    settings = {"allow_origins": ["https://app.example.com"], "max_request_body_bytes": 4096}
    fast = InProcessProxy(settings_for(**settings), documents())
    slow = InProcessProxy(settings_for(**settings, server={"fast_path": False}), documents())
    assert isinstance(fast.asgi, FastPath) and not isinstance(slow.asgi, FastPath)
    yield fast, slow
    fast.close()
    slow.close()


def send_both(pair: tuple[InProcessProxy, InProcessProxy], case: Case) -> tuple[Sent, Sent]:
    fast, slow = pair
    method, target, headers, body = case
    return (
        fast.loop.run_until_complete(call(fast.asgi, method, target, headers, body)),
        slow.loop.run_until_complete(call(slow.asgi, method, target, headers, body)),
    )


@pytest.mark.parametrize("name", list(CASES))
def test_the_fast_path_answers_as_blacksheep_does(pair: tuple[InProcessProxy, InProcessProxy], name: str) -> None:
    fast, slow = send_both(pair, CASES[name])
    assert fast == slow
    assert fast.status != 500, fast  # and nothing here is an internal error


def test_the_cases_cover_what_they_say(pair: tuple[InProcessProxy, InProcessProxy]) -> None:
    """A few answers checked for what they are, so equal answers are not equally wrong."""

    def answer(name: str) -> Sent:
        return send_both(pair, CASES[name])[0]

    assert answer("flags").status == 200 and answer("flags, gzip").header(b"content-encoding") == b"gzip"
    assert gzip.decompress(answer("flags, gzip").body) == answer("flags").body
    assert answer("flags, CORS").header(b"vary") == b"Accept-Encoding, Origin"
    assert answer("flags, unlisted origin").header(b"access-control-allow-origin") is None
    assert answer("flags, not loaded").status == 503 and answer("flags, unknown key").status == 401
    assert answer("flags, PUT").header(b"allow") == b"GET, HEAD" and answer("flags, PUT").status == 405
    assert answer("identity POST").status == 200 and answer("identity POST, text").status == 422
    assert orjson.loads(answer("identity POST, 1 for True").body)["traits"][1]["trait_value"] == 1
    assert answer("identity POST, too large (chunked)").status == 413
    assert answer("identity POST, client gone").status == 499
    assert answer("document, not modified").status == 304 and answer("document, client key").status == 401
    assert answer("ofrep flag, unknown").status == 404 and answer("ofrep flags, if-none-match").status == 304
    assert answer("ofrep flag, escaped key").status == 200
    assert orjson.loads(answer("ofrep flag, two segments").body) == {"detail": "Not Found"}


def test_a_stalled_body_is_408_on_both_paths() -> None:
    settings = settings_for(request_body_timeout_seconds=0.1)
    answers = []
    for fast_path in (True, False):
        app = InProcessProxy(
            settings.model_copy(update={"server": settings.server.model_copy(update={"fast_path": fast_path})}),
            documents(),
        )
        try:
            answers.append(
                app.loop.run_until_complete(
                    call(app.asgi, "POST", b"/api/v1/identities/", [CLIENT, JSON], [b"{", STALL])
                )
            )
        finally:
            app.close()
    assert answers[0] == answers[1]
    assert answers[0].status == 408 and answers[0].header(b"connection") == b"close"


def test_build_asgi_returns_blacksheep_alone_when_the_fast_path_is_off() -> None:
    from proxy.worker.store import Store

    on = settings_for()
    assert on.server.fast_path is True
    served, app = build_asgi(on, Store(on))
    assert isinstance(served, FastPath) and served.app is app


@pytest.mark.parametrize(
    "controls",
    [
        {"access": {"public": ["10.0.0.0/8"]}},  # 127.0.0.1 may not: 403s
        {"access": {"server_keys": ["127.0.0.0/8"], "public": ["10.0.0.0/8"], "operations": ["10.0.0.0/8"]}},
        {"rate_limits": {"per_client_address": {"requests_per_second": 0.001, "burst": 3}}},  # 429 after 3
    ],
)
def test_the_edge_controls_answer_alike_on_both_paths(controls: dict[str, Any]) -> None:
    settings = {"allow_origins": ["https://app.example.com"], **controls}
    fast = InProcessProxy(settings_for(**settings), documents())
    slow = InProcessProxy(settings_for(**settings, server={"fast_path": False}), documents())
    try:
        assert fast.store is not slow.store and fast.asgi is not slow.asgi
        statuses = set()
        for name in ["flags, CORS", "identity POST", "ofrep flag", "document", "flags, other casing", "health"] * 2:
            one, other = send_both((fast, slow), CASES[name])
            assert one == other, name
            statuses.add(one.status)
        assert statuses & {403, 429}, statuses
    finally:
        fast.close()
        slow.close()


def test_a_path_in_other_letters_is_controlled_like_its_route() -> None:
    """BlackSheep matches routes whatever their letters' case; the controls go by the route it matched (before,
    by the path's exact bytes: `/API/v1/Flags/` was open to every address when `access.public` was set)."""
    settings = settings_for(access={"public": ["10.0.0.0/8"]})
    for fast_path in (True, False):
        app = InProcessProxy(settings.model_copy(update={"server": ServerSettings(fast_path=fast_path)}), documents())
        try:
            for path in ("/api/v1/flags/", "/API/v1/Flags/", "/Api/V1/Identities?identifier=x"):
                assert app.get(path, {"X-Environment-Key": "env_client_key_1"}).status == 403, (fast_path, path)
        finally:
            app.close()
