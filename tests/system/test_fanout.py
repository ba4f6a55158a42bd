"""Changes reach every replica at once (issue 21, item 4): two real proxies sharing a real `redis-server`,
the fake Flagsmith API, real SSE clients. The proxies poll rarely, so only the fan-out can explain a change
reaching the other one within a second."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.leader.fanout import CHANNEL
from tests.fake_upstream import FakeFlagsmith
from tests.support import KEYS, ProxyProcess, conformance_documents, proxy_config, wait_for
from tests.system.test_realtime import (
    FEATURE,
    SECRET,
    SERVER_1,
    EventReader,
    flag_updated,
    flags_enabled,
    metric,
    signed_webhook,
    stream_url,
)
from tests.system.test_snapshots import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it: `apt-get install redis-server`)")
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _close_readers() -> Iterator[None]:
    yield
    while EventReader.open_readers:
        EventReader.open_readers.pop().close()


@pytest.fixture
def upstream() -> Iterator[FakeFlagsmith]:
    fake = FakeFlagsmith(conformance_documents()).start()
    yield fake
    fake.stop()


class Listener:
    """A plain Redis subscriber on the proxies' channel, in a thread: what the replicas said."""

    def __init__(self, server: RedisServer) -> None:
        import redis

        self.client = redis.Redis(port=server.port)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(CHANNEL)
        self.messages: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(timeout=0.1)
            if message is not None and message["type"] == "message":
                self.raw.append(message["data"])
                self.messages.append(orjson.loads(message["data"]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()
        self.client.close()


@contextlib.contextmanager
def replicas(
    tmp_path: Path, upstream: FakeFlagsmith, redis_url: str, first_poll: float = 60
) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    """Two proxies sharing `redis_url` (the second polls every 60 s)."""

    def config(poll: float) -> dict[str, Any]:
        return proxy_config(
            upstream.api_url,
            api_poll_frequency_seconds=poll,
            redis_url=redis_url,
            webhook={"secret": SECRET, "min_refresh_interval_seconds": 1},
        )

    first = ProxyProcess(tmp_path / "a", config(first_poll)).start()
    second = ProxyProcess(tmp_path / "b", config(60)).start()
    try:
        first.wait_ready()
        second.wait_ready()
        for proxy in (first, second):  # each leader's subscription is up (it logs so)
            assert wait_for(lambda proxy=proxy: "following changes through redis" in proxy.log(), 10)
        time.sleep(0.3)  # SUBSCRIBE is sent right after that line
        yield first, second
    finally:
        first.stop()
        second.stop()


def snapshot_keys(server: RedisServer) -> list[bytes]:
    import redis

    client = redis.Redis(port=server.port)
    try:
        return list(client.keys("edge-proxy:snapshot:*"))
    finally:
        client.close()


def messages_sent(proxy: ProxyProcess) -> float:
    return metric(proxy, 'edge_proxy_fanout_messages_total{direction="sent",outcome="ok"}')


def test_a_webhook_to_one_replica_reaches_the_others_stream_within_a_second(
    tmp_path: Path, upstream: FakeFlagsmith, redis_server: RedisServer
) -> None:
    listener = Listener(redis_server)
    try:
        with replicas(tmp_path, upstream, redis_server.url) as (a, b):
            reader = EventReader(stream_url(b))
            reader.next_event(5)  # the stream's first event: the current document
            enabled = upstream.toggle(SERVER_1, FEATURE)
            sent = time.monotonic()
            body = flag_updated(1, enabled)
            answer = signed_webhook(a, body)
            assert answer.status_code == 202, answer.text
            at, _ = reader.next_event(2)
            took = at - sent
            assert took < 1, f"B's stream saw the change {took:.2f} s after A's webhook (both poll every 60 s)"
            assert flags_enabled(b) is enabled
            print(f"fan-out: the change on B's stream {took:.3f} s after the webhook to A")
            # the replay window is shared: the delivery A accepted is refused by B
            replay = signed_webhook(b, body)
            assert replay.status_code == 400 and "replayed" in replay.json()["message"]
            # redis_url serves the snapshots too
            assert wait_for(lambda: len(snapshot_keys(redis_server)) == 2, 10)
            # B refreshed because A told it, and did not announce the same document again
            assert wait_for(lambda: metric(b, 'edge_proxy_refresh_requests_total{trigger="peer"}') >= 1, 5)
            time.sleep(1.0)
            assert metric(a, 'edge_proxy_refresh_requests_total{trigger="peer"}') == 0
    finally:
        listener.close()
    kinds = sorted(message["kind"] for message in listener.messages)
    assert kinds == ["document", "webhook"], listener.messages  # A's two; none from B
    document = next(message for message in listener.messages if message["kind"] == "document")
    assert document["environment_id"] == 1 and len(document["digest"]) == 16
    # environments are named by id and key hash: no key ever goes through Redis
    for key in (*KEYS, *KEYS.values()):
        assert not any(key.encode() in raw for raw in listener.raw)


def test_a_replica_that_fetches_a_new_document_tells_the_others(
    tmp_path: Path, upstream: FakeFlagsmith, redis_server: RedisServer
) -> None:
    # A polls every second, B every minute: B learns of the change through A's fetch
    with replicas(tmp_path, upstream, redis_server.url, first_poll=1) as (a, b):
        reader = EventReader(stream_url(b))
        reader.next_event(5)
        enabled = upstream.toggle(SERVER_1, FEATURE)
        changed = time.monotonic()
        at, _ = reader.next_event(4)
        assert at - changed < 2.5  # A's poll (≤ 1 s) + the fan-out
        assert flags_enabled(b) is enabled
        # never looping: B's refresh found what A announced and said nothing; A was never asked to refresh
        time.sleep(1.5)
        assert messages_sent(b) == 0
        assert metric(a, 'edge_proxy_refresh_requests_total{trigger="peer"}') == 0
        assert messages_sent(a) == 1


def test_without_redis_each_replica_goes_on_alone(
    tmp_path: Path, upstream: FakeFlagsmith, redis_server: RedisServer
) -> None:
    with replicas(tmp_path, upstream, redis_server.url) as (a, b):
        redis_server.stop()
        enabled = upstream.toggle(SERVER_1, FEATURE)
        answer = signed_webhook(a, flag_updated(1, enabled))
        assert answer.status_code == 202, answer.text  # the replay check falls back to this replica's markers
        assert wait_for(lambda: flags_enabled(a) is enabled, 5)
        assert wait_for(lambda: metric(a, "edge_proxy_webhook_shared_replay_errors_total") == 1, 5)
        assert b.get("/proxy/health/readiness").status_code == 200
        assert "not hearing other replicas' changes" in a.log() or "change not announced" in a.log()
