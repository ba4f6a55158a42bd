"""Real-time updates against real processes: the SSE stream (the official Python SDK and JS client),
signed webhook refreshes, and a proxy following another proxy's stream."""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
import pytest
from flagsmith import Flagsmith
from flagsmith.webhooks import generate_signature

from tests.support import TESTS, ProxyProcess, conformance_documents, npm_install, proxy_config, serving, wait_for

NODE_DIR = TESTS / "realtime_node"
SERVER_1, CLIENT_1 = "ser.env_server_key_1", "env_client_key_1"
SECRET = "webhook-shared-secret"
FEATURE = "show_banner"


def metric(proxy: ProxyProcess, line_start: str) -> float:
    """The value of the first metrics line starting with `line_start` (0 when absent)."""
    for line in proxy.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def requests_of(proxy: ProxyProcess, route: str) -> float:
    """GET requests answered 200 on `route` (its template, as Flagsmith's API labels routes)."""
    return metric(proxy, f'flagsmith_http_server_requests_total{{method="GET",response_status="200",route="{route}"}}')


class EventReader:
    """An SSE connection read in a thread: `lines` gets (monotonic time, line) as they arrive.

    Plain http.client, so the test can cut the connection (`close`) the way a client that goes away does.
    """

    open_readers: ClassVar[list[EventReader]] = []

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.ended = threading.Event()
        self.opened = threading.Event()
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.thread = threading.Thread(target=self._read, args=(target, headers or {}), daemon=True)
        self.thread.start()
        EventReader.open_readers.append(self)
        assert self.opened.wait(10), "stream did not open"

    def _read(self, target: str, headers: dict[str, str]) -> None:
        try:
            self.connection.request("GET", target, headers={"Accept": "text/event-stream", **headers})
            response = self.connection.getresponse()
            self.status = response.status
            self.headers = {name.lower(): value for name, value in response.getheaders()}
            self.opened.set()
            while line := response.readline():
                self.lines.put((time.monotonic(), line.decode().rstrip("\r\n")))
        except Exception:  # `close` from another thread breaks the read in many ways
            pass
        finally:
            self.opened.set()
            self.ended.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.connection.sock is not None:
                self.connection.sock.shutdown(socket.SHUT_RDWR)
        self.connection.close()

    def next_event(self, timeout: float) -> tuple[float, dict[str, str]]:
        """(arrival time, fields) of the next event with data; comments are skipped."""
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while True:
            at, line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line == "":
                if "data" in fields:
                    return at, fields
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")

    def drain(self) -> list[str]:
        found = []
        while not self.lines.empty():
            found.append(self.lines.get_nowait()[1])
        return found


@pytest.fixture(autouse=True)
def _close_readers() -> Iterator[None]:
    yield
    while EventReader.open_readers:
        EventReader.open_readers.pop().close()


def signed_webhook(proxy: ProxyProcess, body: bytes, secret: str = SECRET) -> httpx.Response:
    headers = {"Content-Type": "application/json", "X-Flagsmith-Signature": generate_signature(body, secret)}
    return httpx.post(proxy.url + "/proxy/webhooks/flagsmith", content=body, headers=headers, timeout=10)


def flag_updated(environment_id: int, enabled: bool) -> bytes:
    """A FLAG_UPDATED payload as Flagsmith sends it (its docs' example, fresh timestamp)."""
    state = {
        "enabled": enabled,
        "environment": {"id": environment_id, "name": "Development"},
        "feature": {"id": 1, "name": FEATURE, "type": "STANDARD", "project": {"id": 1, "name": "p"}},
        "feature_segment": None,
        "feature_state_value": None,
        "identity": None,
        "identity_identifier": None,
    }
    data = {
        "changed_by": "someone@example.com",
        "new_state": state,
        "previous_state": {**state, "enabled": not enabled},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
        "nonce": time.monotonic_ns(),  # distinct bodies even within one second
    }
    return json.dumps({"data": data, "event_type": "FLAG_UPDATED"}, sort_keys=True).encode()


def flags_enabled(proxy: ProxyProcess, key: str = CLIENT_1) -> bool:
    flags = proxy.get("/api/v1/flags/", headers={"X-Environment-Key": key}).json()
    return next(f["enabled"] for f in flags if f["feature"]["name"] == FEATURE)


# -- the stream itself ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    def config(api_url: str) -> dict[str, Any]:
        return proxy_config(
            api_url,
            api_poll_frequency_seconds=1,
            realtime={"keepalive_seconds": 1, "max_streams_per_worker": 4, "max_lifetime_seconds": 600},
        )

    with serving(tmp_path_factory.mktemp("realtime"), conformance_documents(), config) as proxy:
        yield proxy


def stream_url(proxy: ProxyProcess, key: str = CLIENT_1, slash: str = "") -> str:
    return f"{proxy.url}/sse/environments/{key}/stream{slash}"


def test_unknown_or_server_key_is_a_json_error_before_any_stream(proxy: ProxyProcess) -> None:
    unknown = proxy.get("/sse/environments/no-such-key/stream")
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/json"
    assert "no-such-key" in unknown.json()["message"]
    server = proxy.get(f"/sse/environments/{SERVER_1}/stream")
    assert server.status_code == 401
    assert "client-side" in server.json()["message"]
    wrong_method = httpx.post(stream_url(proxy), timeout=10)
    assert wrong_method.status_code == 405


@pytest.mark.parametrize("slash", ["", "/"])
def test_stream_starts_with_the_current_updated_at_and_keeps_alive(proxy: ProxyProcess, slash: str) -> None:
    state = proxy.get("/api/v1/flags/", headers={"X-Environment-Key": CLIENT_1})
    reader = EventReader(stream_url(proxy, slash=slash), {"Origin": "https://app.example"})
    assert reader.status == 200
    assert reader.headers is not None
    assert reader.headers["content-type"] == "text/event-stream"
    assert reader.headers["access-control-allow-origin"] == "https://app.example"
    _, event = reader.next_event(5)
    stamp = state.headers["x-flagsmith-document-updated-at"]
    assert event == {"retry": "1000", "id": stamp, "event": "environment_updated", "data": f'{{"updated_at": {stamp}}}'}
    assert json.loads(event["data"])["updated_at"] == float(stamp)
    # an idle stream carries keep-alive comments (keepalive_seconds=1 here), no events
    time.sleep(2.5)
    lines = reader.drain()
    assert ": keep-alive" in lines
    assert not [line for line in lines if line.startswith("data")]


def test_a_change_is_one_event_and_unchanged_polls_are_none(proxy: ProxyProcess) -> None:
    upstream = proxy.upstream
    assert upstream is not None
    reader = EventReader(stream_url(proxy))
    _, first = reader.next_event(5)
    enabled = upstream.toggle(SERVER_1, FEATURE)
    toggled = time.monotonic()
    at, event = reader.next_event(5)
    assert float(json.loads(event["data"])["updated_at"]) > float(json.loads(first["data"])["updated_at"])
    assert float(event["id"]) == json.loads(event["data"])["updated_at"]
    assert at - toggled < 1 + 0.5  # poll interval 1 s, plus publication
    assert flags_enabled(proxy) is enabled
    # three more unchanged polls: keep-alives only
    time.sleep(3.2)
    assert not [line for line in reader.drain() if line.startswith("data")]
    print(f"poll path: change on the stream {at - toggled:.3f} s after the upstream toggle (poll 1 s)")


def test_last_event_id_gets_only_what_was_missed(proxy: ProxyProcess) -> None:
    current = proxy.get("/api/v1/flags/", headers={"X-Environment-Key": CLIENT_1}).headers[
        "x-flagsmith-document-updated-at"
    ]
    up_to_date = EventReader(stream_url(proxy), {"Last-Event-ID": current})
    behind = EventReader(stream_url(proxy) + "?lastEventId=1.0")  # reconnecting-eventsource's spelling
    _, event = behind.next_event(5)
    assert event["id"] == current
    time.sleep(1.5)
    lines = up_to_date.drain()
    assert ": up to date" in lines
    assert not [line for line in lines if line.startswith("data")]


def test_streams_per_worker_are_bounded_with_a_clear_503(proxy: ProxyProcess) -> None:
    assert wait_for(lambda: metric(proxy, "edge_proxy_streams_connected") == 0, 10)
    readers = [EventReader(stream_url(proxy)) for _ in range(4)]
    assert all(reader.status == 200 for reader in readers)
    assert metric(proxy, "edge_proxy_streams_connected") == 4
    refused = proxy.get("/sse/environments/env_client_key_1/stream")
    assert refused.status_code == 503
    assert "max_streams_per_worker" in refused.json()["message"]
    assert metric(proxy, "edge_proxy_streams_rejected_total") >= 1
    assert metric(proxy, "edge_proxy_stream_events_total") >= 4


def test_streams_past_granians_default_connection_cap_are_answered(tmp_path: Path) -> None:
    """Granian's own default caps a worker at backlog / workers connections (128 here): stream 129 would
    hang unanswered. The proxy sizes the cap from the stream bound, so every stream is answered, the one
    past the bound is the 503, and ordinary requests still get through."""
    bound = 200
    (tmp_path / "granian.toml").write_text("backlog = 128\n")

    def config(api_url: str) -> dict[str, Any]:
        return proxy_config(api_url, realtime={"max_streams_per_worker": bound, "keepalive_seconds": 30})

    request = b"GET /sse/environments/env_client_key_1/stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    with serving(tmp_path, conformance_documents(), config) as proxy, contextlib.ExitStack() as held:
        statuses = []
        for _ in range(bound + 1):
            sock = held.enter_context(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))
            sock.sendall(request)
            statuses.append(sock.recv(64).split(b"\r\n", 1)[0])
        assert statuses[:bound] == [b"HTTP/1.1 200 OK"] * bound
        assert statuses[bound].startswith(b"HTTP/1.1 503")
        assert proxy.get("/api/v1/flags/", headers={"X-Environment-Key": CLIENT_1}).status_code == 200
        assert metric(proxy, "edge_proxy_streams_connected") == bound


def test_clients_that_go_away_are_forgotten(proxy: ProxyProcess) -> None:
    assert wait_for(lambda: metric(proxy, "edge_proxy_streams_connected") == 0, 10)
    readers = [EventReader(stream_url(proxy)) for _ in range(3)]
    assert metric(proxy, "edge_proxy_streams_connected") == 3
    for reader in readers:
        reader.close()
    # the disconnect is noticed at once, not at the next keep-alive write
    assert wait_for(lambda: metric(proxy, "edge_proxy_streams_connected") == 0, 0.9)


def test_lifetime_ends_a_stream_and_sigterm_closes_streams_within_the_drain(tmp_path: Path) -> None:
    def config(api_url: str) -> dict[str, Any]:
        return proxy_config(api_url, realtime={"max_lifetime_seconds": 1.5, "keepalive_seconds": 30})

    with serving(tmp_path, conformance_documents(), config) as proxy:
        short = EventReader(stream_url(proxy))
        started = time.monotonic()
        assert short.ended.wait(5), "the stream outlived realtime.max_lifetime_seconds"
        assert 1.3 < time.monotonic() - started < 4
        held = [EventReader(stream_url(proxy)) for _ in range(3)]
        stopping = time.monotonic()
        assert proxy.stop() == 0
        took = time.monotonic() - stopping
        assert all(reader.ended.wait(1) for reader in held)
        assert took < 10, f"open streams held shutdown for {took:.1f} s"
        assert "refused to gracefully stop" not in proxy.log()


# -- the official SDKs --------------------------------------------------------------------------------


def test_python_sdk_realtime_sees_a_toggle_with_one_document_fetch(proxy: ProxyProcess) -> None:
    upstream = proxy.upstream
    assert upstream is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = Flagsmith(
            environment_key=SERVER_1,
            api_url=f"{proxy.url}/api/v1/",
            enable_local_evaluation=True,
            enable_realtime_updates=True,
            realtime_api_url=f"{proxy.url}/",
        )
    try:
        assert wait_for(lambda: metric(proxy, "edge_proxy_streams_connected") >= 1, 10)
        time.sleep(1.5)  # the stream's first event (the state the SDK holds) must not make it refetch
        fetches = requests_of(proxy, "/api/v1/environment-document/")
        before = client.get_environment_flags().is_feature_enabled(FEATURE)
        enabled = upstream.toggle(SERVER_1, FEATURE)
        assert enabled is not before
        toggled = time.monotonic()
        seen = wait_for(lambda: client.get_environment_flags().is_feature_enabled(FEATURE) is enabled, 5, 0.01)
        took = time.monotonic() - toggled
        assert seen and took < 1 + 1, f"the SDK saw the change after {took:.2f} s"
        time.sleep(1.5)  # further unchanged polls: no further fetches
        assert requests_of(proxy, "/api/v1/environment-document/") - fetches == 1
        print(f"Python SDK: change seen {took:.3f} s after the upstream toggle (poll 1 s)")
    finally:
        client.__del__()


def node_modules() -> None:
    npm_install(NODE_DIR, "the JS client test")


def test_js_client_realtime_sees_a_toggle_with_one_flags_fetch(proxy: ProxyProcess) -> None:
    upstream = proxy.upstream
    assert upstream is not None
    node_modules()
    streams = metric(proxy, "edge_proxy_streams_connected")
    node = subprocess.Popen(
        ["node", "realtime.mjs"],
        cwd=NODE_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
    )
    assert node.stdin is not None and node.stdout is not None
    node.stdin.write(
        json.dumps(
            {
                "api": f"{proxy.url}/api/v1/",
                "eventSourceUrl": f"{proxy.url}/",
                "environmentID": CLIENT_1,
                "feature": FEATURE,
                "runForMs": 30000,
            }
        ).encode()
    )
    node.stdin.close()
    changes: queue.Queue[dict[str, Any]] = queue.Queue()
    threading.Thread(target=lambda: [changes.put(json.loads(line)) for line in node.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        first = changes.get(timeout=30)
        assert wait_for(lambda: metric(proxy, "edge_proxy_streams_connected") > streams, 10)
        time.sleep(1.5)
        fetches = requests_of(proxy, "/api/v1/flags/")
        enabled = upstream.toggle(SERVER_1, FEATURE)
        assert enabled is not first["enabled"]
        toggled = time.time()
        change = changes.get(timeout=5)
        took = change["at"] / 1000 - toggled
        assert change["enabled"] is enabled
        assert took < 1 + 1, f"the JS client saw the change after {took:.2f} s"
        time.sleep(1.5)
        assert requests_of(proxy, "/api/v1/flags/") - fetches == 1
        print(f"JS client: change seen {took:.3f} s after the upstream toggle (poll 1 s)")
    finally:
        node.kill()
        node.wait(10)
        node.stdout.close()


# -- webhooks ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def webhook_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    def config(api_url: str) -> dict[str, Any]:
        return proxy_config(
            api_url, api_poll_frequency_seconds=30, webhook={"secret": SECRET, "min_refresh_interval_seconds": 1}
        )

    with serving(tmp_path_factory.mktemp("webhook"), conformance_documents(), config) as proxy:
        yield proxy


def test_signed_webhook_makes_a_change_visible_within_a_second(webhook_proxy: ProxyProcess) -> None:
    proxy, upstream = webhook_proxy, webhook_proxy.upstream
    assert upstream is not None
    reader = EventReader(stream_url(proxy))
    reader.next_event(5)
    enabled = upstream.toggle(SERVER_1, FEATURE)
    sent = time.monotonic()
    answer = signed_webhook(proxy, flag_updated(1, enabled))
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"status": "refresh_requested", "environment_ids": [1]}
    at, _ = reader.next_event(2)
    assert at - sent < 1
    assert flags_enabled(proxy) is enabled
    print(f"webhook path: change on the stream {at - sent:.3f} s after the webhook (poll 30 s)")
    # only the environment named was refetched
    assert metric(proxy, 'edge_proxy_refresh_requests_total{trigger="webhook"}') == 1


def test_bad_signature_replay_and_malformed_change_nothing(webhook_proxy: ProxyProcess) -> None:
    proxy, upstream = webhook_proxy, webhook_proxy.upstream
    assert upstream is not None
    time.sleep(1.1)  # past the previous test's rate limit
    before = flags_enabled(proxy)
    upstream.toggle(SERVER_1, FEATURE)
    fetched = upstream.count(SERVER_1)
    body = flag_updated(1, not before)
    bad = signed_webhook(proxy, body, secret="not-the-secret")
    assert bad.status_code == 401 and "does not match" in bad.json()["message"]
    unsigned = httpx.post(proxy.url + "/proxy/webhooks/flagsmith", content=body, timeout=10)
    assert unsigned.status_code == 401 and "X-Flagsmith-Signature" in unsigned.json()["message"]
    not_json = signed_webhook(proxy, b"{not json")
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["message"]
    no_type = signed_webhook(proxy, b'{"data": {}}')
    assert no_type.status_code == 400 and "event_type" in no_type.json()["message"]
    stale = json.dumps({"event_type": "FLAG_UPDATED", "data": {"timestamp": "2021-06-18T07:50:26.595298Z"}})
    old = signed_webhook(proxy, stale.encode())
    assert old.status_code == 400 and "replay_window_seconds" in old.json()["message"]
    time.sleep(1.5)
    assert upstream.count(SERVER_1) == fetched, "a refused webhook reached upstream"
    assert flags_enabled(proxy) is before
    # the genuine one works once; the same delivery again is a replay
    assert signed_webhook(proxy, body).status_code == 202
    assert wait_for(lambda: flags_enabled(proxy) is not before, 5)
    replay = signed_webhook(proxy, body)
    assert replay.status_code == 400 and "replayed" in replay.json()["message"]


def test_a_webhook_storm_is_rate_limited_per_environment(webhook_proxy: ProxyProcess) -> None:
    proxy, upstream = webhook_proxy, webhook_proxy.upstream
    assert upstream is not None
    time.sleep(1.1)
    fetched = upstream.count(SERVER_1)
    started = time.monotonic()
    for _ in range(30):
        assert signed_webhook(proxy, flag_updated(1, True)).status_code == 202
    elapsed = time.monotonic() - started
    time.sleep(1.5)
    # at most one refresh per min_refresh_interval_seconds (1 s), plus the one at the start
    assert upstream.count(SERVER_1) - fetched <= 2 + int(elapsed + 1.5)
    # a webhook naming an environment this proxy does not have refreshes every environment
    others = upstream.count("ser.env_server_key_2")
    assert signed_webhook(proxy, flag_updated(999, True)).status_code == 202
    assert wait_for(lambda: upstream.count("ser.env_server_key_2") > others, 5)


# -- proxy follows proxy ----------------------------------------------------------------------------


def test_two_tiers_a_change_reaches_the_downstream_proxy_within_a_second(tmp_path: Path) -> None:
    def tier_a(api_url: str) -> dict[str, Any]:
        return proxy_config(api_url, api_poll_frequency_seconds=30, webhook={"secret": SECRET})

    with serving(tmp_path / "a", conformance_documents(), tier_a) as a:
        upstream = a.upstream
        assert upstream is not None
        b = ProxyProcess(
            tmp_path / "b",
            proxy_config(f"{a.url}/api/v1", api_poll_frequency_seconds=30, upstream_stream_url=f"{a.url}/"),
        ).start()
        try:
            b.wait_ready()
            assert wait_for(lambda: metric(a, "edge_proxy_streams_connected") >= 2, 10)  # B follows both
            # webhooks are off on B (no secret)
            assert httpx.post(b.url + "/proxy/webhooks/flagsmith", content=b"{}", timeout=10).status_code == 404
            reader = EventReader(stream_url(b))
            reader.next_event(5)
            enabled = upstream.toggle(SERVER_1, FEATURE)
            sent = time.monotonic()
            assert signed_webhook(a, flag_updated(1, enabled)).status_code == 202
            at, _ = reader.next_event(2)
            took = at - sent
            assert took < 1, f"B's stream saw the change {took:.2f} s after A's webhook"
            assert flags_enabled(b) is enabled
            print(f"tier path: change on B's stream {took:.3f} s after A's webhook (both poll every 30 s)")
        finally:
            b.stop()


def test_two_changes_within_one_second_reach_the_downstream_proxy(tmp_path: Path) -> None:
    """If-Modified-Since has one-second precision: B holding a document stamped 12.300 s would get 304s
    from A holding 12.700 s until a later change. Between proxies the ETag decides."""
    folder = tmp_path / "documents"  # A's source: files, exact to the nanosecond (mtime)
    folder.mkdir()

    def write(server_key: str, document: dict[str, Any]) -> None:
        tmp = folder / f".{server_key}.tmp"
        tmp.write_text(json.dumps(document))
        os.replace(tmp, folder / f"{server_key}.json")

    documents = conformance_documents()
    for server_key, document in documents.items():
        write(server_key, document)
    first = copy.deepcopy(documents[SERVER_1])
    first["updated_at"] = "2024-05-01T12:00:12.300000+00:00"
    write(SERVER_1, first)
    a = ProxyProcess(tmp_path / "a", proxy_config(f"file://{folder}", api_poll_frequency_seconds=0.5)).start()
    b = ProxyProcess(tmp_path / "b", proxy_config(f"{a.url}/api/v1", api_poll_frequency_seconds=0.5))
    try:
        a.wait_ready()
        b.start()
        b.wait_ready()
        before = flags_enabled(b)
        assert flags_enabled(a) is before
        # B's polls are answered 304 while nothing changes (its If-None-Match matches A's ETag)
        assert wait_for(lambda: metric(b, 'edge_proxy_upstream_fetches_total{outcome="not_modified"}') >= 2, 10)

        second = copy.deepcopy(first)  # changed 400 ms later, within the same second
        for state in second["feature_states"]:
            if state["feature"]["name"] == FEATURE:
                state["enabled"] = not state["enabled"]
        second["updated_at"] = "2024-05-01T12:00:12.700000+00:00"
        write(SERVER_1, second)
        assert wait_for(lambda: flags_enabled(a) is not before, 10), a.log()
        assert wait_for(lambda: flags_enabled(b) is not before, 5), "B still serves the 12.300 s document"
        document = b.get("/api/v1/environment-document/", headers={"X-Environment-Key": SERVER_1})
        assert document.json()["updated_at"] == second["updated_at"]
        upper = a.get("/api/v1/environment-document/", headers={"X-Environment-Key": SERVER_1})
        assert document.headers["etag"] == upper.headers["etag"]  # the same bytes on both tiers

        # a restarted leader on B carries on with the ETag it had (from the manifest), not a date
        leader = b.leader_pid()
        assert leader is not None
        os.kill(leader, signal.SIGKILL)
        assert wait_for(lambda: b.leader_pid() not in (None, leader), 15), b.log()
        third = copy.deepcopy(second)
        for state in third["feature_states"]:
            if state["feature"]["name"] == FEATURE:
                state["enabled"] = not state["enabled"]
        third["updated_at"] = "2024-05-01T12:00:12.900000+00:00"
        write(SERVER_1, third)
        assert wait_for(lambda: flags_enabled(a) is before, 10), a.log()
        assert wait_for(lambda: flags_enabled(b) is before, 5), "B's new leader still serves the 12.700 s document"
    finally:
        b.stop()
        a.stop()


# -- the pieces, without processes ------------------------------------------------------------------


def test_stream_paths_and_routes() -> None:
    from proxy.http.app import route_of
    from proxy.http.stream import client_key_of

    assert client_key_of(b"/sse/environments/abc/stream") == client_key_of(b"/sse/environments/abc/stream/") == "abc"
    assert client_key_of(b"/sse/environments/a%20b/stream") == "a b"
    for bad in (b"/sse/environments//stream", b"/sse/environments/a/b/stream", b"/sse/environments/abc"):
        assert client_key_of(bad) is None
    assert (
        route_of(b"/sse/environments/abc/stream")
        == route_of(b"/sse/environments/abc/stream/")
        == ("/sse/environments/{key}/stream", b"GET, HEAD")
    )
    assert route_of(b"/sse/environments/a/b/stream") is None
    assert route_of(b"/proxy/webhooks/flagsmith/") == ("/proxy/webhooks/flagsmith", b"POST")
    # the other `{param}` route
    assert route_of(b"/ofrep/v1/evaluate/flags/f") == ("/ofrep/v1/evaluate/flags/{key}", b"POST")


def test_webhook_environment_ids_from_every_payload_shape() -> None:
    from proxy.http.webhook import environment_ids, sign

    assert environment_ids(json.loads(flag_updated(23, True))) == [23]
    assert environment_ids({"event_type": "FLAG_DELETED", "data": {"previous_state": {"environment": {"id": 4}}}}) == [
        4
    ]
    assert environment_ids({"event_type": "X", "data": {"environment_id": 7}}) == [7]
    assert environment_ids({"event_type": "AUDIT_LOG_CREATED", "data": {"environment": None}}) == []
    assert environment_ids({"event_type": "X", "data": {"environment": {"id": True}}}) == []  # not an id
    assert environment_ids({"event_type": "X", "data": "nope"}) == []
    body = b'{"event_type":"FLAG_UPDATED"}'
    assert sign(body, SECRET) == generate_signature(body, SECRET)  # what the official SDK computes


def test_realtime_settings_are_validated_and_the_secret_masked() -> None:
    from proxy.config.settings import ConfigError, load_settings, masked_settings

    pairs = [{"server_side_key": SERVER_1, "client_side_key": CLIENT_1}]
    missing = Path("/nonexistent/config.json")
    settings = load_settings(
        missing, environment_key_pairs=pairs, webhook={"secret": SECRET}, upstream_stream_url="http://a:8000"
    )
    assert settings.upstream_stream_url == "http://a:8000/"
    assert settings.realtime.keepalive_seconds == 20
    assert masked_settings(settings)["webhook"]["secret"] == "***"
    with pytest.raises(ConfigError, match="upstream_stream_url"):
        load_settings(missing, environment_key_pairs=pairs, upstream_stream_url="ftp://a")
    with pytest.raises(ConfigError, match=r"webhook\.secret"):
        load_settings(missing, environment_key_pairs=pairs, webhook={"secret": "short"})
    with pytest.raises(ConfigError, match=r"realtime\.keepalive_seconds"):
        load_settings(missing, environment_key_pairs=pairs, realtime={"keepalive_seconds": 0})
