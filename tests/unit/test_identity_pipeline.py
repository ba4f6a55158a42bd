"""The one identity pipeline (proxy/http/identities.py), in process: answers by the body's bytes before any
parsing, for identities and OFREP alike; raw entries bounded, counted and dropped like the others."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from proxy.area.bodies import KeyKind
from proxy.http import identities, ofrep
from proxy.worker.response_cache import ENTRY_OVERHEAD, key_cost
from tests.inprocess import InProcessProxy, settings_for
from tests.support import conformance_documents

CLIENT = {"X-Environment-Key": "env_client_key_1"}
SERVER = {"X-Environment-Key": "ser.env_server_key_1"}
BODY = b'{"identifier":"u1","traits":[{"trait_key":"age","trait_value":30},{"trait_key":"beta","trait_value":true}]}'
CONTEXT = b'{"context":{"targetingKey":"u1","age":30,"beta":true}}'


@pytest.fixture
def proxy() -> Iterator[InProcessProxy]:
    app = InProcessProxy(settings_for(), conformance_documents())
    yield app
    app.close()


def counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    calls: list[int] = []
    original: Callable[..., Any] = getattr(module, name)

    def counted(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_the_same_body_is_answered_without_parsing(proxy: InProcessProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = counting(monkeypatch, identities, "parse_identity_body")
    first = proxy.post("/api/v1/identities/", BODY, CLIENT)
    again = proxy.post("/api/v1/identities/", BODY, CLIENT)
    assert first.status == again.status == 200 and first.raw == again.raw
    assert len(parsed) == 1  # the repeat was answered from its bytes
    # another key kind is another answer (server keys see more): parsed and evaluated, then kept too
    server = proxy.post("/api/v1/identities/", BODY, SERVER)
    assert server.status == 200 and len(parsed) == 2
    # the same identity spelled differently: parsed, then answered from the parsed key
    cache = proxy.store.cache
    assert cache is not None
    misses = cache.misses
    respelled = BODY.replace(b'"identifier":"u1",', b"").replace(b"]}", b'],"identifier":"u1"}')
    assert proxy.post("/api/v1/identities/", respelled, CLIENT).raw == first.raw
    assert len(parsed) == 3 and cache.misses == misses


def test_the_same_context_is_answered_without_parsing(proxy: InProcessProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = counting(monkeypatch, ofrep, "parse_context")
    one = proxy.post("/ofrep/v1/evaluate/flags/max_items", CONTEXT, CLIENT)
    bulk = proxy.post("/ofrep/v1/evaluate/flags", CONTEXT, CLIENT)
    again = proxy.post("/ofrep/v1/evaluate/flags/banner_text", CONTEXT, CLIENT)
    assert one.status == bulk.status == again.status == 200
    assert orjson.loads(one.raw)["key"] == "max_items" and orjson.loads(again.raw)["key"] == "banner_text"
    assert len(parsed) == 1  # one evaluation serves both endpoints and every flag


def test_a_body_refused_for_its_content_type_is_refused_even_when_its_bytes_were_answered(
    proxy: InProcessProxy,
) -> None:
    assert proxy.post("/api/v1/identities/", BODY, CLIENT).status == 200
    assert proxy.post("/api/v1/identities/", BODY, CLIENT, content_type="text/plain").status == 422


def test_raw_entries_are_bounded_counted_and_dropped_with_their_environment() -> None:
    settings = settings_for(endpoint_caches={"identities": {"cache_max_size": 6, "cache_max_bytes": 64 * 1024}})
    app = InProcessProxy(settings, conformance_documents())
    try:
        cache = app.store.cache
        assert cache is not None
        body = BODY.replace(b'"u1"', b'"bounded"')
        answer = app.post("/api/v1/identities/", body, CLIENT)
        assert answer.status == 200 and len(cache) == 2  # under its bytes and under its parsed key
        # each entry's cost from lengths and counts: the body, the request's length (the key's text), 2 traits
        raw_cost = len(answer.raw) + len(body) + 33 + 64 + ENTRY_OVERHEAD
        parsed_cost = len(answer.raw) + key_cost(len(body), 2) + ENTRY_OVERHEAD
        assert cache.size_bytes == raw_cost + parsed_cost
        for i in range(20):
            app.post("/api/v1/identities/", BODY.replace(b'"u1"', b'"u%d"' % i), CLIENT)
        assert len(cache) == 6 and cache.evictions >= 36  # bounded as the LRU: raw entries count as entries
        for i in range(200):  # bounded in bytes too
            app.post("/api/v1/identities/", BODY.replace(b'"u1"', b'"%s"' % (b"x" * 1500 + b"%d" % i)), CLIENT)
        assert cache.size_bytes <= 64 * 1024
        documents = {"env_client_key_1": orjson.dumps(conformance_documents()["ser.env_server_key_1"])}
        app.publish(documents)
        assert len(cache) == 0 and cache.size_bytes == 0  # env 1 changed: its entries, raw ones too, are gone
    finally:
        app.close()


def test_ofrep_answers_are_encoded_once_per_result(proxy: InProcessProxy) -> None:
    """The compiled evaluator's results are shared by every identity landing on them: each is encoded once."""
    state = proxy.state("env_client_key_1")
    first = ofrep.encode_evaluation(state.identity_results(KeyKind.CLIENT, "someone", {"age": 30}), KeyKind.CLIENT)
    second = ofrep.encode_evaluation(
        state.identity_results(KeyKind.CLIENT, "someone-else", {"age": 31}), KeyKind.CLIENT
    )
    shared = [name for name in first.single if first.single[name][1] is second.single[name][1]]
    assert len(shared) >= len(first.single) - 3  # all but the multivariate picks
    assert first.plain == b'{"flags":[' + b",".join(data for _, data in first.single.values()) + b"]}"
