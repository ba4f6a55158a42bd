"""Pure pieces: the response LRU, health rules, request parsing, environment state."""

from __future__ import annotations

import asyncio
import gzip
import json

import orjson
import pytest
from blacksheep import Content
from blacksheep.testing import TestClient

from proxy.area.bodies import Body, KeyKind
from proxy.area.manifest import Location, ManifestEntry
from proxy.config.settings import Settings
from proxy.evaluation.mapping import DocumentError, validate_document
from proxy.http.app import build_app
from proxy.http.health import NOT_UPDATED, STALE, check_health
from proxy.http.identity_request import RequestInvalid, is_json_content_type, parse_identity_body, parse_identity_query
from proxy.worker.environment import EnvironmentState
from proxy.worker.response_cache import ResponseCache
from proxy.worker.store import Store
from tests.support import EXAMPLES

PAIRS = [
    {"server_side_key": "ser.one_server", "client_side_key": "one_client"},
    {"server_side_key": "ser.two_server", "client_side_key": "two_client"},
]


def test_cache_is_bounded_in_entries_and_bytes() -> None:
    cache = ResponseCache(max_entries=3, max_bytes=10_000)
    for i in range(5):
        cache.put("env", (KeyKind.CLIENT, str(i).encode()), Body(b"x" * 100, None))
    assert len(cache) == 3
    assert cache.get("env", (KeyKind.CLIENT, b"0")) is None
    assert cache.get("env", (KeyKind.CLIENT, b"4")) is not None
    big = ResponseCache(max_entries=100, max_bytes=2_000)
    for i in range(10):
        big.put("env", (KeyKind.CLIENT, str(i).encode()), Body(b"x" * 500, None))
    assert big.size_bytes <= 2_000 and len(big) < 10


def test_cache_drops_only_the_changed_environment() -> None:
    cache = ResponseCache(max_entries=10, max_bytes=100_000)
    cache.put("a", (KeyKind.CLIENT, b"1"), Body(b"a", None))
    cache.put("b", (KeyKind.CLIENT, b"1"), Body(b"b", None))
    assert cache.drop_environment("a") == 1
    assert cache.get("a", (KeyKind.CLIENT, b"1")) is None
    assert cache.get("b", (KeyKind.CLIENT, b"1")) == Body(b"b", None)


def settings(**overrides: object) -> Settings:
    return Settings(environment_key_pairs=PAIRS, api_poll_frequency_seconds=10, **overrides)


def status(last_success: float | None) -> ManifestEntry:
    return ManifestEntry(name="n", last_success=last_success, location=Location("env-x-1.json", 2, 0))


def test_health_rules() -> None:
    keys = ["one_client", "two_client"]
    # threshold = poll + grace × pairs = 10 + 30 × 2 = 70 s
    code, body = check_health(settings(), keys, {}, {}, 1000.0)
    assert (code, orjson.loads(body)["reason"]) == (503, NOT_UPDATED)
    fresh = {key: status(990.0) for key in keys}
    code, body = check_health(settings(), keys, fresh, {}, 1000.0)
    assert code == 200 and orjson.loads(body) == {
        "status": "ok",
        "reason": None,
        "last_successful_update": "1970-01-01T00:16:30.000000Z",
    }
    one_stale = {"one_client": status(900.0), "two_client": status(990.0)}
    code, body = check_health(settings(), keys, one_stale, {}, 1000.0)
    assert code == 503 and orjson.loads(body)["reason"] == STALE
    assert orjson.loads(body)["environments"]["stale"][0]["key"] == "on…nt"
    lenient = settings(health_check={"fail_readiness_when": "all_stale"})
    assert check_health(lenient, keys, one_stale, {}, 1000.0)[0] == 200
    all_stale = {key: status(900.0) for key in keys}
    assert check_health(lenient, keys, all_stale, {}, 1000.0)[0] == 503
    never = settings(health_check={"environment_update_grace_period_seconds": None})
    assert check_health(never, keys, all_stale, {}, 10**9)[0] == 200


def test_identity_body_parsing() -> None:
    body = b'{"identifier":"u","traits":[{"trait_key":"a","trait_value":1},{"trait_key":"a","trait_value":2},'
    body += b'{"trait_key":"b"}],"transient":true}'
    identifier, echo, traits = parse_identity_body(body, b"application/json")
    assert identifier == "u"
    assert echo == [
        {"trait_key": "a", "trait_value": 1},
        {"trait_key": "a", "trait_value": 2},
        {"trait_key": "b", "trait_value": None},
    ]
    assert traits == {"a": 2, "b": None}  # the last duplicate wins
    with pytest.raises(RequestInvalid) as invalid:
        parse_identity_body(
            b'{"identifier":"u","traits":[{"trait_key":"a","trait_value":"' + b"x" * 2001 + b'"}]}', None
        )
    assert invalid.value.errors[0]["ctx"] == {"max_length": 2000, "actual_length": 2001}
    assert parse_identity_query(b"identifier=a%20b&identifier=c") == "c"
    assert parse_identity_query(b"identifier=") == ""
    assert is_json_content_type(b"Application/JSON; charset=utf-8") and not is_json_content_type(b"text/json")


def test_environment_state_pre_encodes_everything() -> None:
    document = json.loads((EXAMPLES / "upstream_env2_document.json").read_text())
    state = EnvironmentState.of_document("env_client_key_2", orjson.dumps(document))
    client, server = state.flags(KeyKind.CLIENT), state.flags(KeyKind.SERVER)
    assert client.gzip is not None and orjson.loads(gzip.decompress(client.gzip)) == orjson.loads(client.plain)
    assert len(orjson.loads(server.plain)) == 20
    client_flags = orjson.loads(client.plain)
    assert all(flag["enabled"] for flag in client_flags)  # hide_disabled_flags for client keys
    assert state.flag(KeyKind.CLIENT, "secret_server_flag") is None
    assert state.flag(KeyKind.SERVER, "secret_server_flag") is not None
    assert state.updated_at_header == b"1714564800.0"
    assert state.evaluator is None  # nothing built for identities until one is asked for


def test_document_validation_names_the_field() -> None:
    with pytest.raises(DocumentError, match="document is a JSON list"):
        validate_document([1, 2])
    with pytest.raises(DocumentError, match=r"feature_states\.0\.enabled"):
        validate_document(
            {"api_key": "k", "project": {"segments": []}, "feature_states": [{"feature": {"id": 1, "name": "f"}}]}
        )


def test_identity_cache_key_is_canonical_and_type_exact() -> None:
    document = json.loads((EXAMPLES / "upstream_env1_document.json").read_text())
    config = Settings(
        environment_key_pairs=[{"server_side_key": "ser.env_server_key_1", "client_side_key": "env_client_key_1"}]
    )
    store = Store(config)
    store.states = {"env_client_key_1": EnvironmentState.of_document("env_client_key_1", orjson.dumps(document))}
    app = build_app(config, store)
    headers = {"x-environment-key": "env_client_key_1", "accept-encoding": "identity"}

    async def post(body: bytes) -> bytes:
        client = TestClient(app)
        response = await client.post("/api/v1/identities/", headers=headers, content=Content(b"application/json", body))
        assert response.status == 200
        return await response.read()

    async def scenario() -> None:
        await app.start()
        first = await post(b'{"identifier": "u", "traits": [{"trait_key": "beta", "trait_value": true}]}')
        # the same request, formatted differently, with an ignored field: the cached answer serves it
        again = await post(
            b'{"traits": [{"trait_value": true, "trait_key": "beta", "transient": true}], "identifier": "u"}'
        )
        assert first == again
        assert store.cache is not None and (store.cache.hits, store.cache.misses) == (1, 1)
        # 1 == True in Python, but not in the echoed response: a different entry
        other = await post(b'{"identifier": "u", "traits": [{"trait_key": "beta", "trait_value": 1}]}')
        assert orjson.loads(other)["traits"] == [{"trait_key": "beta", "trait_value": 1}]
        assert store.cache.misses == 2

    asyncio.run(scenario())
