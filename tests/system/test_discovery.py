"""`proxy_key`: environments discovered from `/proxy/config/`, and usage reported to `/proxy/usage/`."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from proxy.leader.discovery import parse_proxy_config
from tests.fake_upstream import FakeFlagsmith
from tests.support import ProxyProcess, wait_for


def environment(client_key: str, *server_keys: dict[str, Any]) -> dict[str, Any]:
    return {"id": 1, "name": client_key, "client_side_key": client_key, "server_side_keys": list(server_keys)}


def key(name: str, active: bool = True, expires_at: str | None = None) -> dict[str, Any]:
    return {"key": name, "active": active, "expires_at": expires_at}


def discovering(upstream: FakeFlagsmith, **overrides: Any) -> dict[str, Any]:
    return {
        "proxy_key": upstream.proxy_key,
        "api_url": upstream.api_url,
        "api_poll_frequency_seconds": 0.5,
        **overrides,
    }


def status(proxy: ProxyProcess, key_header: str) -> int:
    return proxy.get("/api/v1/flags/", headers={"X-Environment-Key": key_header}).status_code


def test_parse_proxy_config_keeps_only_usable_keys() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    later = (now + timedelta(days=1)).isoformat()
    earlier = (now - timedelta(days=1)).isoformat()
    data = [
        environment("a", key("ser.b"), key("ser.a", expires_at=later), key("ser.old", expires_at=earlier)),
        environment("c", key("ser.c", active=False)),
        environment("d", key("not-a-server-key")),
        {"no": "client key"},
    ]
    assert parse_proxy_config(data, now.timestamp()) == {
        "a": {"ser.a": datetime.fromisoformat(later).timestamp(), "ser.b": None}
    }


def test_environments_follow_the_proxy_config(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    upstream.proxy_config = [environment("env_client_key_1", key("ser.env_server_key_1"))]
    proxy = start_proxy(discovering(upstream), workers=2)
    proxy.wait_ready()
    assert status(proxy, "env_client_key_1") == 200
    assert status(proxy, "ser.env_server_key_1") == 200
    assert status(proxy, "env_client_key_2") == 401
    assert not any(r["key"] == "ser.env_server_key_2" for r in upstream.requests)

    # added upstream: served after a sync
    upstream.proxy_config.append(environment("env_client_key_2", key("ser.env_server_key_2")))
    assert wait_for(lambda: status(proxy, "env_client_key_2") == 200, 15), proxy.log()

    # an outage of the config endpoint removes nothing
    upstream.proxy_config_fail = 500
    time.sleep(1.5)
    assert status(proxy, "env_client_key_1") == status(proxy, "env_client_key_2") == 200
    upstream.proxy_config_fail = None

    # removed upstream: its keys stop resolving on every worker, and health forgets it
    upstream.proxy_config = [environment("env_client_key_2", key("ser.env_server_key_2"))]
    assert wait_for(lambda: all(status(proxy, "env_client_key_1") == 401 for _ in range(10)), 15), proxy.log()
    assert status(proxy, "ser.env_server_key_1") == 401
    assert proxy.get("/proxy/health").status_code == 200
    assert "environment removed from proxy config" in proxy.log()


def test_an_expired_server_key_stops_resolving_between_polls(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    # 8 s: enough for start-up on a busy machine (the key must still be valid when the proxy is ready)
    expires = (datetime.now(UTC) + timedelta(seconds=8)).isoformat()
    upstream.proxy_config = [
        environment("env_client_key_1", key("ser.env_server_key_1"), key("ser.rotating", expires_at=expires))
    ]
    proxy = start_proxy(discovering(upstream, api_poll_frequency_seconds=60))
    proxy.wait_ready()
    assert status(proxy, "ser.rotating") == 200
    assert wait_for(lambda: status(proxy, "ser.rotating") == 401, 15)
    assert status(proxy, "ser.env_server_key_1") == 200


def test_static_pairs_are_never_replaced(upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]) -> None:
    upstream.proxy_config = [environment("env_client_key_1", key("ser.env_server_key_2"))]  # collides: skipped
    config = discovering(
        upstream,
        environment_key_pairs=[{"server_side_key": "ser.env_server_key_2", "client_side_key": "env_client_key_2"}],
    )
    proxy = start_proxy(config)
    proxy.wait_ready()
    assert status(proxy, "env_client_key_2") == 200
    assert status(proxy, "env_client_key_1") == 401


def test_usage_is_reported_and_retried_unchanged(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    upstream.proxy_config = [environment("env_client_key_1", key("ser.env_server_key_1"))]
    upstream.usage_fail = 503
    proxy = start_proxy(discovering(upstream, usage_flush_interval_seconds=1), workers=2)
    proxy.wait_ready()
    for _ in range(5):
        assert status(proxy, "env_client_key_1") == 200
        assert proxy.get("/api/v1/identities/?identifier=u", headers={"X-Environment-Key": "env_client_key_1"})
    assert status(proxy, "nope") == 401  # unknown keys are never counted
    document = proxy.get("/api/v1/environment-document/", headers={"X-Environment-Key": "ser.env_server_key_1"})
    assert document.status_code == 200
    assert wait_for(lambda: len(upstream.requests) > 0 and "usage report answered 503" in proxy.log(), 15)
    upstream.usage_fail = None

    def reported() -> dict[str, int]:
        totals: dict[str, int] = {}
        for report in upstream.usage:
            for row in report["rows"]:
                assert row["client_side_key"] == "env_client_key_1"
                totals[row["resource"]] = totals.get(row["resource"], 0) + row["count"]
        return totals

    assert wait_for(lambda: reported() == {"flags": 5, "identities": 5, "environment-document": 1}, 15), (
        reported(),
        proxy.log(),
    )
    assert all(report["idempotency_key"] for report in upstream.usage)
    assert len({report["idempotency_key"] for report in upstream.usage}) == len(upstream.usage)
