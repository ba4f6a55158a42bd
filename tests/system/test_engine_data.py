"""Flagsmith's engine test data through the HTTP API of a real proxy: 101 identities and the environment."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import ENGINE_DATA, ProxyProcess, load_json, serving

SERVER_KEY = "ser.engine_test_data"
EXPECTED = load_json(ENGINE_DATA / "v1_identities_expected_composite_key.json")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    document = load_json(ENGINE_DATA / "v1_environment_n9fbf9h3v4fFgH3U3ngWhb.json")["environment"]
    # The v1 document predates `name` and `updated_at`, which real documents carry.
    document = {**document, "name": "engine-test-data", "updated_at": "2023-11-08T00:00:00+00:00"}
    pairs = [{"server_side_key": SERVER_KEY, "client_side_key": EXPECTED["api_key"]}]
    with serving(
        tmp_path_factory.mktemp("engine"),
        {SERVER_KEY: document},
        lambda api_url: {"environment_key_pairs": pairs, "api_url": api_url},
    ) as proxy:
        yield proxy


def by_name(flags: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(flags, key=lambda flag: flag["feature"]["name"])


def test_environment_flags(proxy: ProxyProcess) -> None:
    response = proxy.get("/api/v1/flags/", headers={"X-Environment-Key": EXPECTED["api_key"]})
    assert response.status_code == 200
    assert by_name(response.json()) == by_name(EXPECTED["environment_flags"])


def test_all_identities_match(proxy: ProxyProcess) -> None:
    assert len(EXPECTED["identities"]) == 101
    mismatches = []
    with httpx.Client(base_url=proxy.url, headers={"X-Environment-Key": EXPECTED["api_key"]}) as client:
        for case in EXPECTED["identities"]:
            response = client.post("/api/v1/identities/", json=case["request"])
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["identifier"] == case["request"]["identifier"]
            if by_name(body["flags"]) != by_name(case["expected_flags"]):
                mismatches.append(case["request"]["identifier"])
    assert mismatches == []
