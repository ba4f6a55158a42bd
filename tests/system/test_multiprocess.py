"""One leader, N Granian workers, shared memory: real processes, real signals, generous time bounds.

The measured figures (propagation delay, leader restart time) are printed with `-s`; the assertions
only bound them loosely so a busy 2-core machine does not flake.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.leader.process import HEARTBEAT_EVERY
from tests.fake_upstream import FakeFlagsmith
from tests.support import (
    EDGE_PROXY,
    KEYS,
    ClientLoop,
    ProxyProcess,
    alive,
    conformance_documents,
    proxy_config,
    wait_for,
)

CLIENT = {"X-Environment-Key": "env_client_key_1"}


def ask_one_connection(proxy: ProxyProcess) -> tuple[int, bool]:
    """(worker pid, show_banner enabled) over one fresh connection, so both answers come from one worker."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        connection.request("GET", "/api/v1/flags/?feature=show_banner", headers=CLIENT)
        enabled = b'"enabled":true' in connection.getresponse().read()
        connection.request("GET", "/proxy/health/liveness")
        connection.getresponse().read()
        connection.request("GET", "/proxy/health")
        response = connection.getresponse()
        response.read()
        return int(response.getheader("x-edge-proxy-worker")), enabled
    finally:
        connection.close()


def test_one_poller_for_all_workers(upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(proxy_config(upstream.api_url, api_poll_frequency_seconds=0.5), workers=2)
    proxy.wait_ready()
    assert len(proxy.worker_pids()) == 2
    start_count, started = upstream.count("ser.env_server_key_1"), time.monotonic()
    time.sleep(3)
    polls = upstream.count("ser.env_server_key_1") - start_count
    elapsed = time.monotonic() - started
    # one poller: about elapsed / interval requests per environment, not × workers
    assert 3 <= polls <= elapsed / 0.5 + 2, polls
    assert upstream.count("ser.env_server_key_2") - polls <= start_count + 2


def test_a_toggle_reaches_every_worker(upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]) -> None:
    interval = 1.0
    config = proxy_config(upstream.api_url, api_poll_frequency_seconds=interval, health_check={"show_details": True})
    proxy = start_proxy(config, workers=2)
    proxy.wait_ready()
    workers = set(proxy.worker_pids())
    expected = upstream.toggle("ser.env_server_key_1", "show_banner")
    toggled_at = time.monotonic()
    updated: dict[int, float] = {}
    deadline = toggled_at + 20
    while time.monotonic() < deadline and set(updated) != workers:
        pid, enabled = ask_one_connection(proxy)
        if enabled is expected and pid not in updated:
            updated[pid] = time.monotonic() - toggled_at
        time.sleep(0.01)
    assert set(updated) == workers, (updated, workers)
    print(f"\npropagation (poll interval {interval}s): {sorted(round(v, 3) for v in updated.values())}")
    assert max(updated.values()) < interval + 5  # measured figure: interval + ~0.1 s; bound is generous


def test_leader_killed_while_serving(upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(proxy_config(upstream.api_url, api_poll_frequency_seconds=0.5), workers=2)
    proxy.wait_ready()
    leader = proxy.leader_pid()
    assert leader is not None
    generation_before = int(proxy.get("/proxy/health").headers["x-edge-proxy-generation"])
    with ClientLoop(proxy.port, "/api/v1/flags/", CLIENT, seconds=30) as client:
        time.sleep(0.5)
        os.kill(leader, signal.SIGKILL)
        killed_at = time.monotonic()
        back = wait_for(lambda: proxy.leader_pid() not in (None, leader), 15, 0.02)
        restart_time = time.monotonic() - killed_at
        requests_before = upstream.count()
        # the new leader polls again (spawning it takes longer when the CPUs are busy)
        wait_for(lambda: upstream.count() >= requests_before + 2, 15)
        time.sleep(0.5)
    failures, served = client.failures, client.served
    assert back, proxy.log()
    print(f"\nleader back after {restart_time:.2f}s; {served} requests served, {len(failures)} failed")
    assert failures == [], failures[:5]
    assert served > 50
    assert restart_time < 10
    # the new leader resumed what was published: conditional requests, answered 304, no refetch
    resumed = upstream.requests[requests_before:]
    assert resumed and all(r["ims"] for r in resumed), (resumed, proxy.log())
    assert proxy.get("/proxy/health").status_code == 200

    def generation() -> int:
        return int(proxy.get("/proxy/health").headers["x-edge-proxy-generation"])

    # resumed, never backwards: the new leader's first publication (its poll status, batched) follows the old
    assert wait_for(lambda: generation() > generation_before, 5), (generation(), generation_before)


def test_hung_leader_is_replaced(upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]) -> None:
    """A SIGSTOPped leader is alive but silent: its heartbeat stops, the supervisor kills and replaces it."""
    timeout = 2.0
    config = proxy_config(upstream.api_url, api_poll_frequency_seconds=0.5, leader_heartbeat_timeout_seconds=timeout)
    proxy = start_proxy(config, workers=1)
    proxy.wait_ready()
    leader = proxy.leader_pid()
    assert leader is not None
    with ClientLoop(proxy.port, "/api/v1/flags/", CLIENT, seconds=40, pause=0.005) as client:
        try:
            time.sleep(0.3)
            os.kill(leader, signal.SIGSTOP)
            stopped_at = time.monotonic()
            replaced = wait_for(lambda: proxy.leader_pid() not in (None, leader), 25, 0.05)
            replaced_after = time.monotonic() - stopped_at
            assert replaced, proxy.log()
            assert not alive(leader)  # killed, not left stopped next to its successor
            requests_before = upstream.count()
            assert wait_for(lambda: upstream.count() >= requests_before + 2, 15), proxy.log()  # the new one polls
        finally:
            if alive(leader):
                os.kill(leader, signal.SIGCONT)
    failures, served = client.failures, client.served
    print(f"\nhung leader replaced after {replaced_after:.2f}s; {served} requests served, {len(failures)} failed")
    assert failures == [], failures[:5]
    assert served > 20
    # silence counts from the last beat, up to one beat interval before the SIGSTOP
    assert timeout - HEARTBEAT_EVERY <= replaced_after < timeout + 10
    assert "has not sent a heartbeat" in proxy.log()
    assert proxy.get("/proxy/health").status_code == 200


def test_worker_killed_is_respawned(upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(proxy_config(upstream.api_url), workers=2)
    proxy.wait_ready()
    before = proxy.worker_pids()
    os.kill(before[0], signal.SIGKILL)
    assert wait_for(lambda: len(proxy.worker_pids()) == 2 and before[0] not in proxy.worker_pids(), 20), proxy.log()
    after = proxy.worker_pids()
    assert before[1] in after
    # the new worker loaded the published state: every connection gets the flags
    for _ in range(20):
        assert proxy.get("/api/v1/flags/", headers=CLIENT).status_code == 200


def test_sigterm_leaves_nothing_behind(upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(proxy_config(upstream.api_url), workers=2)
    proxy.wait_ready()
    family = [proxy.pid, *proxy.worker_pids(), proxy.leader_pid()]
    assert proxy.area.is_dir()
    assert proxy.stop() == 0
    assert wait_for(lambda: not any(alive(pid) for pid in family if pid), 10)
    assert not proxy.area.exists()
    assert "Traceback" not in proxy.log()


def test_start_after_a_sigkilled_predecessor(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    first = start_proxy(proxy_config(upstream.api_url), workers=1)
    first.wait_ready()
    family = [first.pid, *first.worker_pids(), first.leader_pid()]
    for pid in family:
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not any(alive(pid) for pid in family), 10)
    assert first.area.exists()  # what the killed instance left behind
    second = ProxyProcess(tmp_path / "second", proxy_config(upstream.api_url))
    second.port, second.url = first.port, first.url
    second.start()
    try:
        second.wait_ready()
        assert second.get("/api/v1/flags/", headers=CLIENT).status_code == 200
        assert sorted(p.name for p in second.area.glob("env-*.json")) != []
    finally:
        assert second.stop() == 0
    assert not second.area.exists()


def test_orphaned_leader_exits(upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(proxy_config(upstream.api_url), workers=1)
    proxy.wait_ready()
    leader, workers = proxy.leader_pid(), proxy.worker_pids()
    os.kill(proxy.pid, signal.SIGKILL)
    try:
        assert wait_for(lambda: not alive(leader), 10)
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(proxy.area, ignore_errors=True)  # what the killed main process would have removed


@pytest.mark.parametrize("workers", [2])
def test_health_is_the_same_on_every_worker(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess], workers: int
) -> None:
    proxy = start_proxy(proxy_config(upstream.api_url, health_check={"show_details": True}), workers=workers)
    proxy.wait_ready()
    seen: dict[int, int] = {}
    deadline = time.monotonic() + 15
    while len(seen) < workers and time.monotonic() < deadline:
        pid, _ = ask_one_connection(proxy)
        seen[pid] = proxy.get("/proxy/health").status_code
    assert len(seen) == workers and set(seen.values()) == {200}


def test_a_document_that_cannot_be_built_is_never_published(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    fast = {"api_poll_frequency_seconds": 0.3, "health_check": {"environment_update_grace_period_seconds": 0.5}}
    proxy = start_proxy(proxy_config(upstream.api_url, **fast), workers=2)
    proxy.wait_ready()
    before = proxy.get("/api/v1/flags/", headers=CLIENT).json()
    workers = proxy.worker_pids()
    generation = int(proxy.get("/proxy/health").headers["x-edge-proxy-generation"])
    # Valid JSON of the right shape, but a multivariate value without its option cannot be mapped: the
    # leader builds it as a worker would, refuses it and keeps the last good copy.
    document = conformance_documents()["ser.env_server_key_1"]
    broken = next(s for s in document["feature_states"] if s["multivariate_feature_state_values"])
    del broken["multivariate_feature_state_values"][0]["multivariate_feature_option"]
    document["updated_at"] = "2030-01-01T00:00:00+00:00"
    upstream.set_document("ser.env_server_key_1", document)

    def reported() -> bool:
        stale = proxy.get("/proxy/health").json().get("environments", {}).get("stale", [])
        return [e["error"] for e in stale] == ["invalid_document"]

    assert wait_for(reported, 15), proxy.log()
    assert "document cannot be served: KeyError: 'multivariate_feature_option'" in proxy.log()
    assert "failed to build" not in proxy.log()  # no worker ever saw it
    for _ in range(20):
        assert proxy.get("/api/v1/flags/", headers=CLIENT).json() == before
    assert proxy.worker_pids() == workers  # no worker crashed
    # status changes were published (health), the document was not
    assert int(proxy.get("/proxy/health").headers["x-edge-proxy-generation"]) > generation


def test_analytics_from_every_worker_are_forwarded_once(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    config = proxy_config(upstream.api_url, analytics_flush_interval_seconds=0.5)
    proxy = start_proxy(config, workers=2)
    proxy.wait_ready()
    upstream.fail = 503  # the first flushes fail: counts are kept and retried
    for _ in range(10):  # fresh connections spread over both workers
        for key in ("env_client_key_1", "ser.env_server_key_1"):
            with contextlib.closing(http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)) as connection:
                body = b'{"show_banner": 3, "banner_text": 1}'
                connection.request("POST", "/api/v1/analytics/flags/", body, {"X-Environment-Key": key})
                assert connection.getresponse().status == 200
    time.sleep(2)
    upstream.fail = None

    def totals() -> dict[str, int]:
        summed: dict[str, int] = {}
        for report in upstream.analytics:
            assert report["key"] == "ser.env_server_key_1"  # forwarded with the server key
            for name, count in report["body"].items():
                summed[name] = summed.get(name, 0) + count
        return summed

    assert wait_for(lambda: totals() == {"show_banner": 60, "banner_text": 20}, 15), totals()


def test_ctrl_c_shuts_down_cleanly(upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(proxy_config(upstream.api_url), workers=2)
    proxy.wait_ready()
    family = [proxy.pid, *proxy.worker_pids(), proxy.leader_pid()]
    os.killpg(proxy.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole (our own) process group
    assert proxy.process is not None and proxy.process.wait(30) == 0
    assert wait_for(lambda: not any(alive(pid) for pid in family if pid), 10)
    assert not proxy.area.exists()
    assert "restarting in" not in proxy.log()  # the leader ignored SIGINT; the watchdog did not respawn it


def test_sigterm_drains_a_request_in_flight(upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(proxy_config(upstream.api_url), workers=1)
    proxy.wait_ready()
    body = b'{"identifier":"slow-user","traits":[]}'
    head = (
        b"POST /api/v1/identities/ HTTP/1.1\r\nHost: proxy\r\nX-Environment-Key: env_client_key_1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
        client.sendall(head + body[:10])  # the request is in flight: its body is still arriving
        time.sleep(0.3)
        os.kill(proxy.pid, signal.SIGTERM)
        time.sleep(0.5)
        client.sendall(body[10:])
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = client.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert proxy.process is not None and proxy.process.wait(30) == 0


def test_an_area_too_small_is_reported(upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]) -> None:
    # each conformance document is ~12.5 KB: one fits, both do not
    config = proxy_config(upstream.api_url, api_poll_frequency_seconds=0.5, shared_memory_max_bytes=20_000)
    proxy = start_proxy(config)
    proxy.wait_live()
    assert wait_for(lambda: "raise shared_memory_max_bytes" in proxy.log(), 15), proxy.log()
    assert "docker run --shm-size" in proxy.log()
    assert proxy.get("/proxy/health/readiness").status_code == 503
    assert proxy.get("/api/v1/flags/", headers=CLIENT).status_code == 503
    metrics = proxy.get("/metrics").text
    assert re.search(r"^edge_proxy_publication_errors_total [1-9]", metrics, re.M), metrics


def test_a_second_instance_on_the_same_port_is_refused(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    first = start_proxy(proxy_config(upstream.api_url))
    first.wait_ready()
    second = subprocess.run(
        [EDGE_PROXY, "serve", "--port", str(first.port)],
        env=first.env,
        cwd=first.workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    assert "is in use by a running edge-proxy" in second.stderr
    assert first.get("/api/v1/flags/", headers=CLIENT).status_code == 200  # the first one is untouched


def test_a_port_taken_by_another_program_is_one_line_and_exit_2(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        (tmp_path / "config.json").write_text(json.dumps(proxy_config(upstream.api_url)))
        result = subprocess.run(
            [EDGE_PROXY, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, "CONFIG_PATH": str(tmp_path / "config.json")},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"edge-proxy: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in result.stderr and "panicked" not in result.stderr
    assert not (Path("/dev/shm") / f"edge-proxy.{port}").exists()  # the area it created is gone again


def tiny_document(number: int, client_key: str) -> dict[str, object]:
    return {
        "id": number,
        "api_key": client_key,
        "name": f"environment {number}",
        "updated_at": "2024-05-01T12:00:00.000000+00:00",
        "project": {
            "id": 1,
            "name": "project",
            "organisation": {"id": 1, "name": "org", "feature_analytics": False, "persist_trait_data": True},
            "hide_disabled_flags": False,
            "segments": [],
        },
        "feature_states": [
            {
                "feature": {"id": 1, "name": "banner", "type": "STANDARD"},
                "enabled": True,
                "django_id": number + 1,
                "feature_state_value": f"value {number}",
                "multivariate_feature_state_values": [],
            }
        ],
        "identity_overrides": [],
    }


def many_pairs(folder: Path, count: int) -> dict[str, str]:
    """`count` server key → client key pairs, each with its document file in `folder` (a file source)."""
    folder.mkdir(parents=True)
    pairs = {f"ser.many_server_key_{n:05d}": f"many_client_key_{n:05d}" for n in range(count)}
    for number, (server_key, client_key) in enumerate(pairs.items()):
        (folder / f"{server_key}.json").write_text(json.dumps(tiny_document(number, client_key)))
    return pairs


@pytest.mark.timeout(300)
def test_ten_thousand_key_pairs_start_serve_and_log_one_short_line(
    tmp_path: Path, start_proxy: Callable[..., ProxyProcess]
) -> None:
    # ~870 KiB of settings: as one environment variable (past Linux's 128 KiB per string) no leader started
    pairs = many_pairs(tmp_path / "documents", 10_000)
    config = proxy_config(f"file://{tmp_path / 'documents'}", api_poll_frequency_seconds=3600)
    config["environment_key_pairs"] = [{"server_side_key": s, "client_side_key": c} for s, c in pairs.items()]
    proxy = start_proxy(config)
    proxy.wait_live(timeout=60)
    numbers = (0, 4_321, 9_999)
    flags = lambda number: proxy.get("/api/v1/flags/", headers={"X-Environment-Key": f"many_client_key_{number:05d}"})  # noqa: E731
    # polled gently: health lists every environment (~0.1 s of the one worker's time with 10,000 of them)
    assert wait_for(lambda: all(flags(number).status_code == 200 for number in numbers), 150, 1.0), proxy.log()[-3000:]
    for number in numbers:
        assert flags(number).json()[0]["feature_state_value"] == f"value {number}"
    assert wait_for(lambda: proxy.status_of("/proxy/health/readiness") == 200, 30, 1.0)
    lines = [line for line in proxy.log().splitlines() if "settings" in line and "edge-proxy" in line]
    assert len(lines) == 1 and len(lines[0]) < 2_000, lines[0][:3_000]
    assert "10000 environment key pair" in lines[0]
    assert not re.search(r"many_(server|client)_key_\d{5}", proxy.log())  # masked, where shown at all


def environ_of(pid: int) -> str:
    return (Path("/proc") / str(pid) / "environ").read_bytes().replace(b"\0", b"\n").decode(errors="replace")


def test_no_child_process_has_the_settings_or_a_secret_in_its_environment(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    # a secret given as an environment override is the main process's own; its children never get it
    proxy = start_proxy(proxy_config(upstream.api_url), workers=2, env={"STATUS_TOKEN": "status-token-4711"})
    proxy.wait_ready()
    leader = proxy.leader_pid()
    workers = proxy.worker_pids()
    assert leader is not None and len(workers) == 2
    leader_environ = environ_of(leader)
    assert "status-token-4711" not in leader_environ and "STATUS_TOKEN" not in leader_environ
    for pid in (leader, *workers):
        environ = environ_of(pid)
        assert "EDGE_PROXY_SETTINGS" not in environ
        for server_key, client_key in KEYS.items():
            assert server_key not in environ and client_key not in environ, (pid, environ)
    settings_file = proxy.area / "settings.json"
    assert settings_file.stat().st_mode & 0o777 == 0o600
    assert proxy.get("/proxy/status", headers={"Authorization": "Bearer status-token-4711"}).status_code == 200
