"""One test per upstream fault, against the fake Flagsmith API: the other environments keep refreshing, the
bad one keeps its last good copy, and health, logs and metrics name it. Real proxy processes."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fake_upstream import FakeFlagsmith
from tests.support import EDGE_PROXY, ProxyProcess, free_port, proxy_config, wait_for, world_readable_install

NOBODY = ["nobody", "nogroup"]

ENV1 = {"X-Environment-Key": "env_client_key_1"}
ENV2 = {"X-Environment-Key": "ser.env_server_key_2"}  # env2 hides disabled flags from client keys
FAST = {
    "api_poll_frequency_seconds": 0.3,
    "api_poll_timeout_seconds": 1,
    "health_check": {"environment_update_grace_period_seconds": 0.5},
}


def banner(proxy: ProxyProcess, key: dict[str, str]) -> bool:
    return proxy.get("/api/v1/flags/?feature=show_banner", headers=key).json()["enabled"]


def stale(proxy: ProxyProcess) -> dict[str, str | None]:
    entries = proxy.get("/proxy/health").json().get("environments", {}).get("stale", [])
    return {entry["key"]: entry["error"] for entry in entries}


def metric(proxy: ProxyProcess, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", proxy.get("/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0


def assert_env2_keeps_refreshing(proxy: ProxyProcess, upstream: FakeFlagsmith) -> None:
    expected = upstream.toggle("ser.env_server_key_2", "show_banner")
    assert wait_for(lambda: banner(proxy, ENV2) is expected, 5), proxy.log()


@pytest.mark.parametrize("fault", ["trickle", "stall"])
def test_one_slow_environment_never_stalls_the_others(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess], fault: str
) -> None:
    proxy = start_proxy(proxy_config(upstream.api_url, api_fetch_deadline_seconds=1.5, **FAST))
    proxy.wait_ready()
    before = proxy.get("/api/v1/flags/", headers=ENV1).json()
    upstream.toggle("ser.env_server_key_1", "show_banner")  # a change env1 must not get half of
    if fault == "trickle":
        upstream.trickle["ser.env_server_key_1"] = 0.05  # 16 bytes every 50 ms: each read is quick
    else:
        upstream.stall.add("ser.env_server_key_1")
    for _ in range(3):  # again and again while env1 is stuck
        assert_env2_keeps_refreshing(proxy, upstream)
    assert wait_for(lambda: stale(proxy) == {"en…_1": "timeout"}, 10), proxy.get("/proxy/health").text
    assert proxy.get("/api/v1/flags/", headers=ENV1).json() == before  # the last good copy
    assert "api_fetch_deadline_seconds" in proxy.log()
    assert metric(proxy, "edge_proxy_upstream_fetches_total", '{outcome="error"}') >= 1


def test_an_oversized_document_is_refused_naming_the_setting(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    proxy = start_proxy(proxy_config(upstream.api_url, max_document_bytes=200_000, **FAST))
    proxy.wait_ready()
    before = proxy.get("/api/v1/flags/", headers=ENV1).json()
    upstream.toggle("ser.env_server_key_1", "show_banner")
    upstream.oversize["ser.env_server_key_1"] = 300_000
    assert wait_for(lambda: stale(proxy) == {"en…_1": "too_large"}, 10), proxy.log()
    assert "raise max_document_bytes" in proxy.log()
    assert proxy.get("/api/v1/flags/", headers=ENV1).json() == before
    assert_env2_keeps_refreshing(proxy, upstream)


def _break(document: dict[str, Any], how: str) -> None:
    segment_rule = document["project"]["segments"][0]["rules"][0]
    if how == "rule_without_type":
        del segment_rule["type"]
    elif how == "condition_without_operator":
        del segment_rule["rules"][0]["conditions"][0]["operator"]
    elif how == "variant_without_allocation":
        state = next(s for s in document["feature_states"] if s["multivariate_feature_state_values"])
        del state["multivariate_feature_state_values"][0]["percentage_allocation"]
    elif how == "server_only_ids_not_a_list":
        document["project"]["server_key_only_feature_ids"] = 5
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["rule_without_type", "condition_without_operator", "variant_without_allocation", "server_only_ids_not_a_list"],
)
def test_a_document_workers_could_not_build_is_never_published(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess], how: str
) -> None:
    proxy = start_proxy(proxy_config(upstream.api_url, **FAST))
    proxy.wait_ready()
    before = proxy.get("/api/v1/flags/", headers=ENV1).json()
    document = copy.deepcopy(upstream.documents["ser.env_server_key_1"])
    _break(document, how)
    document["updated_at"] = "2030-01-01T00:00:00+00:00"
    upstream.set_document("ser.env_server_key_1", document)
    assert wait_for(lambda: stale(proxy) == {"en…_1": "invalid_document"}, 10), proxy.log()
    assert "document cannot be served" in proxy.log()
    assert proxy.get("/api/v1/flags/", headers=ENV1).json() == before
    assert_env2_keeps_refreshing(proxy, upstream)
    assert "Traceback" not in proxy.log()


def test_an_updated_at_with_an_offset_is_served_in_gmt(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    document = copy.deepcopy(upstream.documents["ser.env_server_key_1"])
    document["updated_at"] = "2024-05-01T14:00:00+02:00"
    upstream.set_document("ser.env_server_key_1", document)
    proxy = start_proxy(proxy_config(upstream.api_url, **FAST))
    proxy.wait_ready()
    response = proxy.get("/api/v1/environment-document/", headers={"X-Environment-Key": "ser.env_server_key_1"})
    assert response.status_code == 200
    assert response.headers["last-modified"] == "Wed, 01 May 2024 12:00:00 GMT"
    assert response.headers["x-flagsmith-document-updated-at"] == "1714564800.0"
    assert proxy.get("/api/v1/flags/", headers=ENV1).status_code == 200


def _discovered(client_key: str, server_keys: Any) -> dict[str, Any]:
    return {"client_side_key": client_key, "server_side_keys": server_keys}


def test_bad_discovery_entries_are_skipped_and_never_take_over_a_key(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    good = [{"key": "ser.env_server_key_2", "active": True, "expires_at": None}]
    upstream.proxy_config = [
        _discovered("env_client_key_bad", 5),  # crashed the leader in a loop before
        _discovered("ser.looks_like_a_server_key", good),
        _discovered("env_client_key_2", good),
        # another environment claiming env2's server key: refused, env2 keeps it
        _discovered("env_client_key_thief", [{"key": "ser.env_server_key_2", "active": True}]),
    ]
    config = {"proxy_key": upstream.proxy_key, "api_url": upstream.api_url, "api_poll_frequency_seconds": 0.5}
    proxy = start_proxy(config)
    proxy.wait_ready()
    leader = proxy.leader_pid()
    assert proxy.get("/api/v1/flags/", headers=ENV2).status_code == 200
    server = proxy.get("/api/v1/environment-document/", headers={"X-Environment-Key": "ser.env_server_key_2"})
    assert server.json()["api_key"] == "env_client_key_2"
    assert proxy.get("/api/v1/flags/", headers={"X-Environment-Key": "env_client_key_thief"}).status_code == 401
    assert proxy.get("/api/v1/flags/", headers={"X-Environment-Key": "env_client_key_bad"}).status_code == 401
    log = proxy.log()
    assert "entry 0 skipped: server_side_keys is not a list" in log
    assert "entry 1 skipped: client_side_key" in log
    assert "is already used" in log
    wait_for(lambda: False, 1.5)  # a few more syncs: the leader stays the same process
    assert proxy.leader_pid() == leader
    assert "Traceback" not in proxy.log()


def test_sigterm_drains_a_slow_final_analytics_flush(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    # upstream takes 6 s to accept analytics: more than the 5 s the leader used to get before being killed
    upstream.analytics_delay = 6
    config = proxy_config(upstream.api_url, analytics_flush_interval_seconds=60, api_poll_timeout_seconds=8)
    proxy = start_proxy(config)
    proxy.wait_ready()
    response = proxy.get("/api/v1/flags/", headers=ENV1)
    assert response.status_code == 200
    import httpx

    assert httpx.post(proxy.url + "/api/v1/analytics/flags/", json={"show_banner": 7}, headers=ENV1).status_code == 200
    wait_for(lambda: False, 1.5)  # the worker hands its counts over (every second)
    assert proxy.stop(timeout=40) == 0
    assert [r["body"] for r in upstream.analytics] == [{"show_banner": 7}], proxy.log()


def test_counts_survive_a_killed_leader_while_upstream_fails(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    proxy = start_proxy(proxy_config(upstream.api_url, analytics_flush_interval_seconds=0.5))
    proxy.wait_ready()
    upstream.fail = 503  # flushes fail: the leader keeps the counts
    import httpx

    assert httpx.post(proxy.url + "/api/v1/analytics/flags/", json={"banner_text": 4}, headers=ENV1).status_code == 200
    assert wait_for(lambda: "retrying later" in proxy.log(), 10), proxy.log()
    leader = proxy.leader_pid()
    assert leader is not None
    os.kill(leader, signal.SIGKILL)  # what it held in memory would be gone: it is on disk
    assert wait_for(lambda: proxy.leader_pid() not in (None, leader), 15)
    upstream.fail = None
    assert wait_for(lambda: [r["body"] for r in upstream.analytics] == [{"banner_text": 4}], 15), proxy.log()


def test_an_area_owned_by_another_user_is_one_line_and_exit_2() -> None:
    folder = Path(tempfile.mkdtemp(prefix="edge-proxy-test-"))  # pytest's own folders are root-only
    try:
        port = free_port()
        shm = folder / "shm"
        shm.mkdir()
        shm.chmod(0o777)
        area = shm / f"edge-proxy.{port}"
        area.mkdir(mode=0o700)  # root's; the proxy runs as nobody
        (area / "lock").write_text("1")
        config = folder / "config.json"
        pair = {"server_side_key": "ser.a_server_key", "client_side_key": "a_client"}
        config.write_text(json.dumps({"environment_key_pairs": [pair], "shared_memory_dir": str(shm)}))
        config.chmod(0o644)
        folder.chmod(0o755)
        # nobody cannot enter a checkout in a private folder (`git clone` into `mktemp -d`): it runs a copy
        with world_readable_install(NOBODY) as python:
            as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
            result = subprocess.run(
                [*as_nobody, python, "-m", "proxy", "serve", "--port", str(port)],
                # without coverage's subprocess hook: as nobody it could not write our coverage data
                env={
                    **{k: v for k, v in os.environ.items() if k != "COVERAGE_PROCESS_CONFIG"},
                    "CONFIG_PATH": str(config),
                    "HOME": "/tmp",
                },
                capture_output=True,
                text=True,
                timeout=60,
                cwd="/tmp",
            )
    finally:
        shutil.rmtree(folder)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "edge-proxy:" in line]
    assert len(errors) == 1 and "cannot be taken over (owned by uid 0" in errors[0], result.stderr


def test_check_config_masks_every_secret(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "environment_key_pairs": [{"server_side_key": "ser.secret_server_key", "client_side_key": "client_k"}],
                "api_url": "https://admin:hunter2@flagsmith.internal/api/v1",
            }
        )
    )
    granian = tmp_path / "granian.toml"
    granian.write_text('ssl_certificate = "/c.pem"\nssl_keyfile = "/k.pem"\nssl_keyfile_password = "sesame"\n')
    result = subprocess.run(
        [EDGE_PROXY, "check-config", "--granian-config", str(granian)],
        env={**os.environ, "CONFIG_PATH": str(config)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for secret in ("hunter2", "admin", "sesame", "secret_server_key"):
        assert secret not in result.stdout, secret
    printed = json.loads(result.stdout)
    assert printed["settings"]["api_url"] == "https://***@flagsmith.internal/api/v1"
    assert printed["granian"]["ssl_keyfile_password"] == "***"
