"""The official Python SDK (flagsmith 6.3.0) pointed at a real proxy instead of Flagsmith's API: remote
evaluation, local evaluation from the proxy's environment document, and flag analytics."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
from flagsmith import Flagsmith

from tests.support import ProxyProcess, conformance_documents, proxy_config, serving, wait_for

IDENTITIES = [
    ("user-42", {"plan": "premium", "age": 30}),
    ("vip-user-1", {}),
    ("tester@example.com", {"beta": True}),
    ("someone", {"country": "GB", "app_version": "2.3.1"}),
]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    def config(api_url: str) -> dict[str, object]:
        return proxy_config(api_url, analytics_flush_interval_seconds=0.5)

    with serving(tmp_path_factory.mktemp("sdk"), conformance_documents(), config) as proxy:
        yield proxy


def sdk(proxy: ProxyProcess, key: str, **options: object) -> Flagsmith:
    return Flagsmith(environment_key=key, api_url=f"{proxy.url}/api/v1/", **options)


def test_remote_evaluation(proxy: ProxyProcess) -> None:
    client = sdk(proxy, "env_client_key_1")
    flags = client.get_environment_flags()
    assert flags.is_feature_enabled("show_banner")
    assert flags.get_feature_value("banner_text") == "Welcome!"
    identity = client.get_identity_flags("user-42", traits={"plan": "premium", "age": 30})
    assert identity.get_feature_value("max_items") is not None


def test_local_evaluation_from_the_proxys_document_agrees_with_remote(proxy: ProxyProcess) -> None:
    remote = sdk(proxy, "ser.env_server_key_1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        local = sdk(proxy, "ser.env_server_key_1", enable_local_evaluation=True)
    try:
        for identifier, traits in IDENTITIES:
            theirs = local.get_identity_flags(identifier, traits=traits)
            ours = remote.get_identity_flags(identifier, traits=traits)
            for flag in ours.all_flags():
                assert theirs.get_flag(flag.feature_name).enabled == flag.enabled, (identifier, flag.feature_name)
                assert theirs.get_flag(flag.feature_name).value == flag.value, (identifier, flag.feature_name)
    finally:
        local.__del__()


def test_sdk_analytics_reach_upstream(proxy: ProxyProcess) -> None:
    upstream = proxy.upstream
    assert upstream is not None
    client = sdk(proxy, "env_client_key_1", enable_analytics=True)
    flags = client.get_environment_flags()
    for _ in range(3):
        flags.is_feature_enabled("show_banner")
    client._analytics_processor.flush()

    def forwarded() -> bool:
        return any(r["body"].get("show_banner") == 3 for r in upstream.analytics)

    assert wait_for(forwarded, 30), upstream.analytics
