"""The leader in process, through its seams: `Poller(settings, source, publisher)`, a fake source or the HTTP
source over httpx's MockTransport (this tier only), real servers on 127.0.0.1 where timing is the point."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.area.manifest import ManifestEntry
from proxy.area.names import JOURNAL
from proxy.area.publication import Area, Publisher, Subscriber
from proxy.config.settings import Settings
from proxy.evaluation.environment import answers_for, parse_updated_at
from proxy.leader.discovery import Discovery
from proxy.leader.environments import Environment
from proxy.leader.poller import Poller
from proxy.leader.schedule import Schedule
from proxy.leader.sources import Fetched, FetchFailed, FetchResult, HttpSource, NotModified, Validator
from tests.support import KEYS, conformance_documents


@pytest.fixture
def area(tmp_path: Path) -> Iterator[Area]:
    created = Area(Path("/dev/shm") / f"edge-proxy-test.{os.getpid()}.{tmp_path.name}")
    created.create()
    yield created
    created.remove()


def settings(**overrides: Any) -> Settings:
    pairs = [{"server_side_key": server, "client_side_key": client} for server, client in KEYS.items()]
    return Settings(environment_key_pairs=pairs, api_url="http://127.0.0.1:9", **overrides)


class FakeSource:
    """Answers from a dict of documents by server key: 200 unconditionally, 304 when the date is not older."""

    def __init__(self, documents: dict[str, dict[str, Any]]) -> None:
        self.documents = documents
        self.fetches: list[tuple[str, Validator | None]] = []

    async def fetch(self, server_key: str, held: Validator | None) -> FetchResult:
        self.fetches.append((server_key, held))
        document = self.documents.get(server_key)
        if document is None:
            return FetchFailed("upstream answered HTTP 401", "http_4xx")
        updated_at = held.updated_at if held is not None else None
        if updated_at is not None and updated_at >= parse_updated_at(document["updated_at"]):
            return NotModified()
        return Fetched(document)

    async def aclose(self) -> None:
        return None


async def run_for(poller: Poller, seconds: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(poller.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    await task


def test_documents_are_published_with_their_answers_and_then_only_what_changed(area: Area) -> None:
    source = FakeSource(conformance_documents())
    with Publisher(area.path) as publisher, Subscriber(area.path) as subscriber:
        poller = Poller(settings(api_poll_frequency_seconds=0.3), source, publisher)
        asyncio.run(run_for(poller, 1.5))
        update = subscriber.read()
        assert update is not None and set(update.published) == set(KEYS.values())
        assert all(files.answers is not None for files in update.published.values())
        assert len(source.fetches) > 4  # polled again: 304s
        journal = sorted((area.path / JOURNAL).iterdir(), key=lambda path: int(path.stem))
        last = orjson.loads(journal[-1].read_bytes())
        assert set(last["changed"]) <= set(KEYS.values()) and last["removed"] == []
        assert all("answers_file" not in entry or entry["answers_file"] for entry in last["changed"].values())
        # once published, the answers are the area's: the leader keeps the document only
        assert all(env.answers is None and env.document for env in poller.environments.values())


def test_a_document_no_worker_could_serve_is_not_published(area: Area) -> None:
    documents = conformance_documents()
    documents["ser.env_server_key_2"]["project"]["segments"] = [{"id": 1, "name": "s", "rules": "nope"}]
    with Publisher(area.path) as publisher, Subscriber(area.path) as subscriber:
        poller = Poller(settings(), FakeSource(documents), publisher)
        asyncio.run(run_for(poller, 0.6))
        update = subscriber.read()
        assert update is not None and set(update.published) == {"env_client_key_1"}
        assert update.entries["env_client_key_2"].error_kind == "invalid_document"


def test_a_new_leader_takes_over_the_published_documents_without_refetching_them(area: Area) -> None:
    first_source = FakeSource(conformance_documents())
    with Publisher(area.path) as publisher:
        asyncio.run(run_for(Poller(settings(), first_source, publisher), 0.6))
    second_source = FakeSource(conformance_documents())
    with Publisher(area.path) as publisher:
        poller = Poller(settings(), second_source, publisher)
        poller.resume()  # the one adoption: the document and its identity, from the publication
        env = poller.environments["env_client_key_1"]
        assert env.document is not None and env.environment_id == 1 and not env.dirty
        asyncio.run(run_for(poller, 0.4))
    assert all(held is not None for _, held in second_source.fetches)  # conditional: nothing refetched whole


def test_the_http_source_through_a_transport(area: Area) -> None:
    """The httpx path (kept for environment proxies and these tests): a same-origin redirect followed."""
    document = conformance_documents()["ser.env_server_key_1"]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/environment-document/":
            return httpx.Response(307, headers={"location": "/api/v2/environment-document/"})
        return httpx.Response(200, stream=httpx.ByteStream(orjson.dumps(document)))

    source = HttpSource(settings(), transport=httpx.MockTransport(handler))
    result = asyncio.run(source.fetch("ser.env_server_key_1", None))
    assert isinstance(result, Fetched) and result.document["id"] == 1


def test_schedules_spread_evenly_over_the_interval() -> None:
    """At start every environment is fetched at once; the next round must not repeat that burst."""
    schedule = Schedule(60.0)
    envs = [Environment(f"c{i}", {f"ser.{i}": None}) for i in range(10_000)]
    for env in envs:
        schedule.succeeded(env, now=0.0)  # before: every one due again at exactly 60 s
    bins = [0] * 10
    for env in envs:
        assert 30.0 <= env.next_due < 90.0
        bins[int((env.next_due - 30.0) / 6)] += 1
    assert min(bins) > 800 and max(bins) < 1200, bins  # evenly: about 1,000 per 6 s
    for env in envs:
        due = env.next_due
        schedule.succeeded(env, now=due)
        assert 54.0 <= env.next_due - due <= 66.0  # then an interval ± 10 %


def test_the_proxy_config_has_its_own_deadline_and_a_failure_names_its_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answer = orjson.dumps(
        [{"client_side_key": "c1", "server_side_keys": [{"key": "ser.one", "active": True, "expires_at": None}]}]
    )

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.8)  # longer than api_poll_timeout_seconds
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(answer)
            writer.write(head + answer)
            await writer.drain()
        except (asyncio.CancelledError, ConnectionError):
            pass  # the client gave up first
        finally:
            writer.close()

    async def scenario(deadline: float) -> Any:
        server = await asyncio.start_server(slow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        discovery = Discovery(
            Settings(
                proxy_key="pk",
                api_url=f"http://127.0.0.1:{port}/api/v1",
                api_poll_timeout_seconds=0.3,
                api_fetch_deadline_seconds=deadline,
            )
        )
        try:
            return await discovery.fetch(time.time())
        finally:
            await discovery.aclose()
            server.close()

    # before: the answer timed out after api_poll_timeout_seconds and was retried forever with the same
    assert asyncio.run(scenario(5.0)) == {"c1": {"ser.one": None}}
    with caplog.at_level(logging.WARNING, logger="proxy.leader"):
        assert asyncio.run(scenario(0.4)) is None
    assert "proxy config: no answer within 0.4 s" in caplog.text

    def times_out(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("")  # httpx's timeouts have no text: the line said "proxy config: ;"

    discovery = Discovery(Settings(proxy_key="pk", api_url="http://127.0.0.1:9"), httpx.MockTransport(times_out))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="proxy.leader"):
        assert asyncio.run(discovery.fetch(time.time())) is None
    assert "proxy config: ReadTimeout; keeping" in caplog.text


FAKE_UPSTREAM = """
import sys
from tests.fake_upstream import FakeFlagsmith
from tests.support import conformance_documents
base = conformance_documents()["ser.env_server_key_1"]
count = int(sys.argv[1])
upstream = FakeFlagsmith({f"ser.s{i}": {**base, "api_key": f"c{i}", "id": i} for i in range(count)}).start()
print(upstream.port, flush=True)
sys.stdin.read()  # until the test closes it
"""


def test_polls_answered_304_keep_every_environment_fresh_through_the_pool(area: Area) -> None:
    """Everything a conditional fetch costs the leader's loop: the schedule, the fetch through the pool, the
    status and its publication, metrics. The leader runs here; the fake upstream in a process of its own, so
    only the leader's work is counted (the loop's thread CPU time)."""
    count = 200
    upstream = subprocess.Popen(
        [sys.executable, "-c", FAKE_UPSTREAM, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # connections the test drops at its end are reported there
        text=True,
    )
    try:
        assert upstream.stdout is not None
        port = int(upstream.stdout.readline())
        pairs = [{"server_side_key": f"ser.s{i}", "client_side_key": f"c{i}"} for i in range(count)]
        api_url = f"http://127.0.0.1:{port}/api/v1"
        config = Settings(environment_key_pairs=pairs, api_url=api_url, api_poll_frequency_seconds=1.0)
        with Publisher(area.path) as publisher:
            poller = Poller(config, HttpSource(config), publisher)

            async def scenario() -> float:
                stop = asyncio.Event()
                task = asyncio.create_task(poller.run(stop))
                while sum(env.document is not None for env in poller.environments.values()) < count:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(2.0)  # into the spread rounds: every fetch a 304
                best = float("inf")
                for _ in range(3):  # the best of three seconds: the machine is shared
                    fetched, started = sum(env.fetched for env in poller.environments.values()), time.thread_time()
                    await asyncio.sleep(1.0)
                    fetched = sum(env.fetched for env in poller.environments.values()) - fetched
                    best = min(best, (time.thread_time() - started) / max(1, fetched))
                    assert fetched > count / 2  # every environment about once a second
                stop.set()
                await task
                await poller.source.aclose()
                return best

            per_fetch = asyncio.run(scenario())
    finally:
        assert upstream.stdin is not None and upstream.stdout is not None
        upstream.stdin.close()
        upstream.wait(timeout=10)
        upstream.stdout.close()
    # about 0.45 ms on the development VM, of it 0.12 ms the fetch itself (tests/test_http11.py), the rest the
    # loop waking for each fetch, the timers and the kernel's loopback; with httpx the fetch alone took 1-1.6 ms
    # The figure is a measurement, not an assertion (speed targets live in benchmarks: `benchmarks/scale.py`
    # records leader CPU per fetch); a timed assertion failed a loaded CI run at 1.08 ms.
    print(f"\nleader CPU per poll answered 304, all included: {per_fetch * 1000:.3f} ms")


def test_a_status_only_round_publishes_the_changed_entries_alone(area: Area) -> None:
    source = FakeSource(conformance_documents())
    with Publisher(area.path) as publisher:
        poller = Poller(settings(), source, publisher)
        asyncio.run(run_for(poller, 0.4))
        generation = publisher.generation
        poller.environments["env_client_key_1"].last_success = 1.0
        poller.publication.changed("env_client_key_1")
        assert poller.publication.publish()
        delta = orjson.loads((area.path / JOURNAL / f"{generation + 1}.json").read_bytes())
        assert list(delta["changed"]) == ["env_client_key_1"] and delta["changed"]["env_client_key_1"]["file"]
        entry = ManifestEntry.from_json(delta["changed"]["env_client_key_1"])
        assert entry.answers is not None  # where the answers are stays in the entry
        assert answers_for(poller.environments["env_client_key_1"].document or b"")  # still servable
