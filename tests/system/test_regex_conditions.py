"""One crafted trait against a real proxy with REGEX segments (before: `^(a+)+$` and 36 `a`s and a `!` left the
POST unanswered after 20 s and held every other request on that worker with it)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import ProxyProcess, conformance_documents, proxy_config, serving, wait_for

CATASTROPHIC_TEXT = "a" * 36 + "!"

CLIENT = {"X-Environment-Key": "env_client_key_1"}
OTHER_ENVIRONMENT = {"X-Environment-Key": "env_client_key_2"}


def regex_segment(segment_id: int, name: str, prop: str, pattern: str, feature: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": segment_id,
        "name": name,
        "rules": [
            {
                "type": "ALL",
                "conditions": [],
                "rules": [{"type": "ANY", "conditions": [{"operator": "REGEX", "property_": prop, "value": pattern}]}],
            }
        ],
        "feature_states": [
            {
                "feature": feature,
                "enabled": True,
                "django_id": 9000 + segment_id,
                "featurestate_uuid": f"00000000-0000-4000-8000-00000000{9000 + segment_id}",
                "feature_segment": {"priority": segment_id},
                "feature_state_value": name,
                "multivariate_feature_state_values": [],
            }
        ],
    }


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    documents = conformance_documents()
    document = documents["ser.env_server_key_1"]
    banner = next(fs["feature"] for fs in document["feature_states"] if fs["feature"]["name"] == "show_banner")
    document["project"]["segments"] += [
        regex_segment(901, "regex_on_re2", "email", r"^(a+)+$", banner),
        # A lookahead: RE2 cannot run it, the bounded path does.
        regex_segment(902, "regex_bounded", "nick", r"^(?=a)(a|aa)+$", banner),
        # A path the compiled evaluator leaves to flag-engine for this segment.
        regex_segment(903, "regex_in_flag_engine", "$.identity.traits['mail']", r"^([a-z]+)*$", banner),
    ]

    with serving(tmp_path_factory.mktemp("regex"), documents, proxy_config) as proxy:
        yield proxy


def identity(proxy: ProxyProcess, traits: dict[str, Any], timeout: float) -> httpx.Response:
    body = {"identifier": "crafted", "traits": [{"trait_key": k, "trait_value": v} for k, v in traits.items()]}
    return httpx.post(proxy.url + "/api/v1/identities/", json=body, headers=CLIENT, timeout=timeout)


def banner_value(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return next(f["feature_state_value"] for f in response.json()["flags"] if f["feature"]["name"] == "show_banner")


@pytest.mark.parametrize(
    "traits",
    [
        {"email": CATASTROPHIC_TEXT},  # the compiled evaluator, RE2
        {"nick": "a" * 60 + "!"},  # the compiled evaluator, bounded path
        {"mail": "a" * 36 + "!"},  # one segment in flag-engine
        {"email": CATASTROPHIC_TEXT, "huge": "9" * 400},  # a number too long for the compiled path: flag-engine
    ],
    ids=["re2", "bounded", "segment_in_flag_engine", "request_in_flag_engine"],
)
def test_a_crafted_trait_answers_quickly_and_the_worker_keeps_serving(
    proxy: ProxyProcess, traits: dict[str, Any]
) -> None:
    """One worker: the crafted POST and a concurrent GET of another environment both answer within seconds
    (before: no answer in 20 s, and the GET waited with it)."""
    assert proxy.workers == 1
    answers: dict[str, Any] = {}

    def crafted() -> None:
        try:
            answers["post"] = identity(proxy, traits, timeout=10)
        except httpx.HTTPError as exc:
            answers["post"] = exc

    thread = threading.Thread(target=crafted)
    started = time.monotonic()
    thread.start()
    time.sleep(0.05)  # the POST first, so the GET queues behind it on the one worker
    other = httpx.get(proxy.url + "/api/v1/flags/", headers=OTHER_ENVIRONMENT, timeout=10)
    thread.join(15)
    elapsed = time.monotonic() - started
    assert other.status_code == 200
    assert isinstance(answers.get("post"), httpx.Response), answers
    assert banner_value(answers["post"]) is None  # no segment matched: the environment's value
    assert elapsed < 3, elapsed


def test_ordinary_values_still_match_through_http(proxy: ProxyProcess) -> None:
    assert banner_value(identity(proxy, {"email": "aaaa"}, 10)) == "regex_on_re2"
    assert banner_value(identity(proxy, {"nick": "aaaa"}, 10)) == "regex_bounded"
    assert banner_value(identity(proxy, {"mail": "abc"}, 10)) == "regex_in_flag_engine"


def test_timeouts_are_counted_and_logged_once(proxy: ProxyProcess) -> None:
    for _ in range(2):
        identity(proxy, {"nick": "a" * 60 + "!", "n": time.monotonic()}, 10)

    def counted() -> bool:
        found = re.search(r"^edge_proxy_regex_timeouts_total ([0-9.]+)$", proxy.get("/metrics").text, re.M)
        return found is not None and float(found.group(1)) >= 2

    assert wait_for(counted, 10), proxy.get("/metrics").text
    assert proxy.log().count("'^(?=a)(a|aa)+$': a match ran out") == 1
    assert "Traceback" not in proxy.log()
