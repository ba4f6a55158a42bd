"""`proxy_key`: environments discovered from `/proxy/config/`, and usage reported to `/proxy/usage/`."""

from __future__ import annotations

import re
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

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


def test_counts_kept_for_an_unreachable_upstream_survive_a_restart(upstream: FakeFlagsmith, tmp_path: Path) -> None:
    upstream.proxy_config = [environment("env_client_key_1", key("ser.env_server_key_1"))]
    snapshots = tmp_path / "snapshots"
    config = discovering(
        upstream,
        usage_flush_interval_seconds=1,
        analytics_flush_interval_seconds=0.5,
        snapshot_dir=str(snapshots),
    )
    client = {"X-Environment-Key": "env_client_key_1"}
    first = ProxyProcess(tmp_path / "first", config).start()
    second = ProxyProcess(tmp_path / "second", config)
    try:
        first.wait_ready()
        upstream.fail = upstream.usage_fail = 503  # upstream down: documents, analytics and usage
        for _ in range(3):
            assert first.get("/api/v1/flags/", headers=client).status_code == 200
        body = b'{"show_banner": 4}'
        for _ in range(2):
            assert httpx.post(first.url + "/api/v1/analytics/flags/", content=body, headers=client).status_code == 200
        retried = ("usage report answered 503", "analytics for en…_1: upstream answered 503")
        assert wait_for(lambda: all(line in first.log() for line in retried), 15), first.log()
        assert first.stop() == 0  # SIGTERM: a rolling restart, upstream still down
        kept_files = list(snapshots.glob("pending-*.json"))
        assert kept_files, f"nothing kept: {sorted(path.name for path in snapshots.iterdir())}"
        [kept] = kept_files
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert b"ser.env_server_key_1" not in kept.read_bytes()
        assert "kept in pending-" in first.log()

        second.start()
        second.wait_live()
        # The three GETs make one usage row, or two when a usage flush fell between them: the sum is what counts.
        restored = re.compile(r"restored 8 analytics count\(s\) and [12] usage row\(s\)")
        assert wait_for(lambda: restored.search(second.log()) is not None, 10), second.log()
        assert not list(snapshots.glob("pending-*.json")) and not list(snapshots.glob(".pending-*"))  # claimed
        upstream.fail = upstream.usage_fail = None  # upstream back: the counts of before the restart arrive

        def analytics() -> int:
            return sum(report["body"].get("show_banner", 0) for report in upstream.analytics)

        def usage() -> int:
            return sum(row["count"] for report in upstream.usage for row in report["rows"])

        assert wait_for(lambda: analytics() == 8 and usage() == 3, 15), (analytics(), usage(), second.log())
        time.sleep(1.5)  # a few more flushes: nothing is sent twice
        assert (analytics(), usage()) == (8, 3)
    finally:
        second.stop()
        first.stop()


def test_counts_kept_in_the_snapshot_redis_survive_a_restart(upstream: FakeFlagsmith, tmp_path: Path) -> None:
    """No snapshot_dir, a snapshot Redis: the counts go to a Redis list; a forged entry there is dropped."""
    import redis

    from tests.system.test_snapshots import RedisServer, needs_redis_server

    needs_redis_server()
    server = RedisServer(tmp_path / "redis")
    upstream.proxy_config = [environment("env_client_key_1", key("ser.env_server_key_1"))]
    config = discovering(
        upstream, usage_flush_interval_seconds=1, analytics_flush_interval_seconds=0.5, snapshot_redis_url=server.url
    )
    client = {"X-Environment-Key": "env_client_key_1"}
    first = ProxyProcess(tmp_path / "first", config).start()
    second = ProxyProcess(tmp_path / "second", config)
    inspect = redis.Redis(port=server.port)
    try:
        first.wait_ready()
        upstream.fail = upstream.usage_fail = 503
        assert first.get("/api/v1/flags/", headers=client).status_code == 200
        body = b'{"show_banner": 3}'
        assert httpx.post(first.url + "/api/v1/analytics/flags/", content=body, headers=client).status_code == 200
        assert wait_for(lambda: "analytics for en…_1: upstream answered 503" in first.log(), 15), first.log()
        assert first.stop() == 0
        assert "kept in the Redis list edge-proxy:pending" in first.log(), first.log()
        [kept] = inspect.lrange("edge-proxy:pending", 0, -1)
        assert b"ser.env_server_key_1" not in kept
        inspect.rpush(
            "edge-proxy:pending",
            b'{"format": 1, "mac": "00"}\n{"analytics": {"env_client_key_1": {"show_banner": 1000}}}',
        )

        second.start()
        second.wait_live()
        restored = re.compile(r"restored 3 analytics count\(s\) and 1 usage row\(s\)")
        assert wait_for(lambda: restored.search(second.log()) is not None, 10), second.log()
        assert "edge-proxy:pending[1] dropped: not authenticated" in second.log()
        assert inspect.llen("edge-proxy:pending") == 0  # claimed
        upstream.fail = upstream.usage_fail = None

        def analytics() -> int:
            return sum(report["body"].get("show_banner", 0) for report in upstream.analytics)

        def usage() -> int:
            return sum(row["count"] for report in upstream.usage for row in report["rows"])

        assert wait_for(lambda: analytics() == 3 and usage() == 1, 15), (analytics(), usage(), second.log())
    finally:
        inspect.close()
        second.stop()
        first.stop()
        server.stop()


def test_a_forged_pending_file_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from proxy.config.settings import Settings
    from proxy.supervisor import pending_counts as pending

    area = tmp_path / "area"
    area.mkdir()
    snapshots = tmp_path / "snapshots"
    settings = Settings(proxy_key="pk.secret", snapshot_dir=str(snapshots))
    (area / "usage").mkdir()
    row = {"client_side_key": "c", "resource": "flags", "count": 2}
    (area / "usage" / "batches.json").write_bytes(orjson.dumps([["k1", [row]]]))
    pending.keep(settings, area)
    [kept] = snapshots.glob("pending-*.json")
    # someone who can write the directory but has no proxy_key: a changed count is refused, whole
    forged = kept.read_bytes().replace(b'"count":2', b'"count":9')
    kept.write_bytes(forged)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with caplog.at_level("INFO"):
        pending.restore(settings, fresh)
    assert "not authenticated" in caplog.text and not (fresh / "usage").exists()
    assert not list(snapshots.glob("*pending-*"))


def test_an_unreachable_redis_loses_the_kept_counts_with_a_log_line_and_never_holds_the_exit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy.config.settings import Settings
    from proxy.supervisor import pending_counts as pending
    from tests.support import free_port

    area = tmp_path / "area"
    (area / "usage").mkdir(parents=True)
    row = {"client_side_key": "c", "resource": "flags", "count": 2}
    (area / "usage" / "batches.json").write_bytes(orjson.dumps([["k1", [row]]]))
    url = f"redis://:secret-password@127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = Settings(proxy_key="pk.secret", snapshot_redis_url=url)
    started = time.monotonic()
    with caplog.at_level("INFO"):
        pending.keep(settings, area)
        pending.restore(settings, tmp_path)
    assert time.monotonic() - started < 10  # bounded by the Redis timeouts (2 s each)
    assert "pending counts could not be kept, dropped" in caplog.text
    assert "kept counts in Redis not read" in caplog.text
    assert "secret-password" not in caplog.text
    assert (area / "usage" / "batches.json").exists()  # not kept anywhere: the area's copy was left as it was


def test_pending_counts_are_bounded_and_what_is_dropped_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy.config.settings import Settings
    from proxy.supervisor import pending_counts as pending

    def area_with(rows: int, analytics: dict[str, dict[str, int]]) -> Path:
        area = tmp_path / f"area-{len(list(tmp_path.iterdir()))}"
        (area / "usage").mkdir(parents=True)
        (area / "analytics").mkdir()
        every = [{"client_side_key": "c", "resource": f"r{i}", "count": 1} for i in range(rows)]
        batches = [[f"k{i}", every[i : i + 1000]] for i in range(0, rows, 1000)]
        (area / "usage" / "batches.json").write_bytes(orjson.dumps(batches))
        (area / "analytics" / "pending.json").write_bytes(orjson.dumps(analytics))
        return area

    # without snapshot_dir: dropped at exit, and the log says how much
    with caplog.at_level("INFO"):
        pending.keep(Settings(proxy_key="pk.secret"), area_with(10, {"c": {"f": 5}}))
    assert "5 analytics count(s) and 10 usage row(s) not forwarded upstream are dropped at exit" in caplog.text

    # with it: at most MAX_ROWS usage rows are kept, the rest is dropped with a log line
    settings = Settings(proxy_key="pk.secret", snapshot_dir=str(tmp_path / "snapshots"))
    caplog.clear()
    with caplog.at_level("INFO"):
        pending.keep(settings, area_with(pending.MAX_ROWS + 500, {"c": {"f": 5}}))
    assert "500 usage row(s) beyond the 100000 kept across a restart dropped" in caplog.text
    fresh = tmp_path / "fresh"
    (fresh / "usage").mkdir(parents=True)
    pending.restore(settings, fresh)
    restored = orjson.loads((fresh / "usage" / "batches.json").read_bytes())
    assert sum(len(rows) for _, rows in restored) == pending.MAX_ROWS
    assert orjson.loads((fresh / "analytics" / "pending.json").read_bytes()) == {"c": {"f": 5}}
