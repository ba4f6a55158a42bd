"""Publication proportional to change: the journal, readers behind it, and a worker's incremental updates."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from proxy.area.bodies import KeyKind
from proxy.area.manifest import ManifestEntry
from proxy.area.names import JOURNAL, MANIFEST
from proxy.area.publication import Area, Publisher, Subscriber
from proxy.config.settings import Settings
from proxy.http.errors import Unauthorized
from proxy.worker.keys import KeyIndex
from proxy.worker.store import Follower, Store, build_states


@pytest.fixture
def area(tmp_path: Path) -> Iterator[Area]:
    created = Area(Path("/dev/shm") / f"edge-proxy-test.{os.getpid()}.{tmp_path.name}")
    created.create()
    yield created
    created.remove()


def entries(count: int, last_success: float = 1.0) -> dict[str, ManifestEntry]:
    return {
        f"c{i}": ManifestEntry(server_keys={f"ser.s{i}": None}, name=f"environment {i}", last_success=last_success)
        for i in range(count)
    }


def test_a_status_only_change_writes_that_entry_alone(area: Area) -> None:
    with Publisher(area.path) as publisher, Subscriber(area.path) as subscriber:
        published = entries(1000)
        publisher.publish({key: b"{}" for key in published}, published)
        subscriber.read()
        manifest = (area.path / MANIFEST).stat()
        one = {"c7": ManifestEntry(server_keys={"ser.s7": None}, name="environment 7", last_success=2.0)}
        generation = publisher.publish_changes({}, one)
        journal = area.path / JOURNAL / f"{generation}.json"
        assert journal.stat().st_size < 600  # before: the whole manifest (1,000 entries, ~300 KB) was rewritten
        assert (area.path / MANIFEST).stat().st_ino == manifest.st_ino  # not rewritten
        update = subscriber.read()
        assert update is not None and not update.full
        assert list(update.entries) == ["c7"] and update.entries["c7"].last_success == 2.0
        assert update.published == {} and update.meta is None


FULL_EVERY = 16  # generations between full manifests, in this test


def test_a_reader_behind_the_journal_reads_the_manifest_then_the_entries_after_it(area: Area) -> None:
    publisher = Publisher(area.path, full_every=FULL_EVERY)
    with publisher, Subscriber(area.path) as current, Subscriber(area.path) as behind:
        publisher.publish({"c0": b"0", "c1": b"1"}, entries(2))
        behind.read()
        current.read()
        for n in range(3 * FULL_EVERY + 5):  # past two full manifests: the journal before them is gone
            publisher.publish_changes({"c0": b"%d" % n} if n % 7 == 0 else {}, entries(1, last_success=n))
            update = current.read()
            assert update is not None and not update.full
        assert len(list((area.path / JOURNAL).iterdir())) <= 2 * FULL_EVERY + 1  # the journal does not grow
        update = behind.read()
        assert update is not None and update.full
        assert update.generation == publisher.generation == current.seen
        assert update.entries["c0"].last_success == 3 * FULL_EVERY + 4 and set(update.entries) == {"c0", "c1"}
        assert update.published["c0"].document.bytes() == b"%d" % (3 * FULL_EVERY + 4 - (3 * FULL_EVERY + 4) % 7)


def test_removals_and_a_restarted_publisher_carry_on_from_the_journal(area: Area) -> None:
    with Publisher(area.path) as first, Subscriber(area.path) as subscriber:
        first.publish({"c0": b"0", "c1": b"1"}, entries(2))
        subscriber.read()
        first.publish_changes({"c1": b"one"}, {}, removed=["c0"])
        update = subscriber.read()
        assert update is not None and not update.full
        assert update.removed == {"c0"} and set(update.published) == {"c1"}
        with Publisher(area.path) as second:
            resumed = second.resume()  # the manifest of generation 1, then the journal after it
            assert resumed is not None and resumed.generation == 2 and set(resumed.environments) == {"c1"}
            assert second.read_document(resumed.environments["c1"]) == b"one"
            second.publish_changes({}, {}, removed=["c1"])
        update = subscriber.read()
        assert update is not None and not update.full and update.removed == {"c1"}


def test_the_key_index_is_updated_per_environment() -> None:
    keys = KeyIndex({"c1": {"ser.a": None, "ser.b": None}})
    keys.set("c1", {"ser.b": None, "ser.c": None})  # rotation: a out, c in
    with pytest.raises(Unauthorized):
        keys.lookup(b"ser.a")
    assert keys.lookup(b"ser.c") == (KeyKind.SERVER, "c1")
    keys.set("c2", {"ser.b": None})  # a key moved to another environment stays with it
    keys.remove("c1")
    assert keys.lookup(b"ser.b") == (KeyKind.SERVER, "c2")
    assert list(keys.client_keys) == ["c2"]
    with pytest.raises(Unauthorized):
        keys.lookup(b"c1")


def test_a_workers_work_per_generation_is_proportional_to_what_changed(area: Area) -> None:
    count = 10_000
    settings = Settings(proxy_key="pk", api_url="http://127.0.0.1:9")
    store = Store(settings, area.path)
    with Publisher(area.path) as publisher, Subscriber(area.path) as subscriber:
        published = entries(count)
        publisher.publish({}, published)
        follower = Follower(store, subscriber)
        started = time.perf_counter()
        follower.load_now()
        whole = time.perf_counter() - started
        keys = store.keys
        assert len(store.entries) == count and store.keys.lookup(b"ser.s9999") == (KeyKind.SERVER, "c9999")
        elapsed = []
        for n in range(10):  # a 304 answered for one environment per generation
            entry = ManifestEntry(server_keys={"ser.s5": None}, name="environment 5", last_success=2.0 + n)
            publisher.publish_changes({}, {"c5": entry})
            started = time.perf_counter()
            update = subscriber.read()
            assert update is not None
            store.apply(update, build_states(update.published, {})[0])
            elapsed.append(time.perf_counter() - started)
        assert store.keys is keys and store.entries["c5"].last_success == 11.0
        # before: every generation parsed the whole manifest and rebuilt the key index, as the first load does
        assert min(elapsed) < whole / 50, (min(elapsed), whole)
        moved = ManifestEntry(server_keys={"ser.new": None}, name="environment 5")
        publisher.publish_changes({}, {"c5": moved}, removed=["c6"])
        update = subscriber.read()
        assert update is not None
        store.apply(update, {})
        assert store.keys.lookup(b"ser.new") == (KeyKind.SERVER, "c5")
        for gone in (b"ser.s5", b"c6", b"ser.s6"):
            with pytest.raises(Unauthorized):
                store.keys.lookup(gone)
        assert "c6" not in store.entries and len(store.keys.client_keys) == count - 1


def test_the_journal_entry_names_its_generation(area: Area) -> None:
    with Publisher(area.path) as publisher, Subscriber(area.path) as subscriber:
        publisher.publish({}, entries(1))
        subscriber.read()
        generation = publisher.publish_changes({}, entries(1, last_success=5.0))
        journal = area.path / JOURNAL / f"{generation}.json"
        data = orjson.loads(journal.read_bytes())
        journal.write_bytes(orjson.dumps({**data, "generation": generation + 1}))  # not the entry it says it is
        assert subscriber.read() is None and subscriber.changed()  # never trusted: retried on the next read
        publisher.publish_changes({}, entries(1, last_success=6.0))
        update = subscriber.read()  # still not past it: the manifest is behind the entry it cannot trust
        assert update is None
