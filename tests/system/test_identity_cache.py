"""The identity and OFREP caches keyed by what evaluation reads: values Python finds equal but REGEX,
PERCENTAGE_SPLIT and the echo read differently (-0.0 and 0.0) get their own answers. Before: after one
request with -0.0, the same identity with 0.0 got the -0.0 answer (and echo) from the cache."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import ProxyProcess, conformance_documents, proxy_config, serving

CLIENT = {"X-Environment-Key": "env_client_key_1", "Accept-Encoding": "identity"}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    documents = conformance_documents()
    document = documents["ser.env_server_key_1"]
    banner = next(fs["feature"] for fs in document["feature_states"] if fs["feature"]["name"] == "show_banner")
    document["project"]["segments"].append(
        {
            "id": 950,
            "name": "negative_scores",
            "rules": [{"type": "ALL", "conditions": [{"operator": "REGEX", "property_": "score", "value": "^-"}]}],
            "feature_states": [
                {
                    "feature": banner,
                    "enabled": True,
                    "django_id": 9950,
                    "featurestate_uuid": "00000000-0000-4000-8000-000000009950",
                    "feature_segment": {"priority": 1},
                    "feature_state_value": "negative",
                    "multivariate_feature_state_values": [],
                }
            ],
        }
    )
    with serving(tmp_path_factory.mktemp("identity-cache"), documents, proxy_config) as proxy:
        yield proxy


def identity(proxy: ProxyProcess, identifier: str, score: Any) -> dict[str, Any]:
    body = {"identifier": identifier, "traits": [{"trait_key": "score", "trait_value": score}]}
    response = httpx.post(proxy.url + "/api/v1/identities/", json=body, headers=CLIENT, timeout=10)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def banner(answer: dict[str, Any]) -> Any:
    return next(f["feature_state_value"] for f in answer["flags"] if f["feature"]["name"] == "show_banner")


def test_minus_zero_and_zero_get_their_own_identity_answers(proxy: ProxyProcess) -> None:
    assert proxy.workers == 1  # one identity cache
    negative = identity(proxy, "zero-user", -0.0)
    assert banner(negative) == "negative" and negative["traits"][0]["trait_value"] == -0.0
    positive = identity(proxy, "zero-user", 0.0)
    assert banner(positive) is None, positive  # the environment's value: "0.0" does not start with "-"
    assert str(positive["traits"][0]["trait_value"]) == "0.0"
    assert banner(identity(proxy, "zero-user", -0.0)) == "negative"  # both stay cached, apart


def ofrep(proxy: ProxyProcess, context: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        proxy.url + "/ofrep/v1/evaluate/flags/show_banner", json={"context": context}, headers=CLIENT, timeout=10
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_minus_zero_and_zero_get_their_own_ofrep_answers(proxy: ProxyProcess) -> None:
    negative = ofrep(proxy, {"targetingKey": "ofrep-zero", "score": -0.0})
    assert negative["value"] == "negative" and negative["reason"] == "TARGETING_MATCH"
    positive = ofrep(proxy, {"targetingKey": "ofrep-zero", "score": 0.0})
    assert positive["reason"] != "TARGETING_MATCH", positive
    assert ofrep(proxy, {"targetingKey": "ofrep-zero", "score": -0.0})["value"] == "negative"
