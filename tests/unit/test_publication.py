"""The publication protocol: incremental, verified, never torn, and safe when the area is too small."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.area.manifest import Location, Manifest, ManifestEntry
from proxy.area.publication import Area, AreaError, Publisher, Subscriber


@pytest.fixture
def area(tmp_path: Path) -> Iterator[Area]:
    created = Area(Path("/dev/shm") / f"edge-proxy-test.{os.getpid()}.{tmp_path.name}")
    created.create()
    yield created
    created.remove()


def entry(name: str = "env", last_success: float = 1.0) -> ManifestEntry:
    return ManifestEntry(server_keys={f"ser.{name}": None}, name=name, last_success=last_success)


def test_publish_then_read(area: Area) -> None:
    with Publisher(area.path) as publisher, Subscriber(area.path) as subscriber:
        assert not subscriber.changed()
        publisher.publish({"a": b'{"x":1}'}, {"a": entry()})
        assert subscriber.changed()
        manifest, documents = subscriber.poll()
        assert documents == {"a": b'{"x":1}'}
        assert manifest.generation == 1
        assert not subscriber.changed()


def test_changing_one_of_many_environments_writes_one_document(area: Area) -> None:
    with Publisher(area.path) as publisher, Subscriber(area.path) as subscriber:
        entries = {f"env{i}": entry(f"env{i}") for i in range(1000)}
        publisher.publish({key: f'{{"n":"{key}"}}'.encode() for key in entries}, entries)
        subscriber.poll()
        before = set(os.listdir(area.path))
        publisher.publish({"env7": b'{"n":"changed"}'}, entries)
        added = set(os.listdir(area.path)) - before
        assert added == {next(name for name in added if name.startswith("env-"))}  # one new document file
        _, documents = subscriber.poll()
        assert documents == {"env7": b'{"n":"changed"}'}


def test_a_status_only_publication_carries_no_documents(area: Area) -> None:
    with Publisher(area.path) as publisher, Subscriber(area.path) as subscriber:
        publisher.publish({"a": b"{}"}, {"a": entry()})
        subscriber.poll()
        publisher.publish({}, {"a": entry(last_success=2.0)})
        manifest, documents = subscriber.poll()
        assert documents == {}
        assert manifest.environments["a"].last_success == 2.0


def test_corrupted_document_is_not_handed_out(area: Area) -> None:
    with Publisher(area.path) as publisher, Subscriber(area.path) as subscriber:
        publisher.publish({"a": b'{"x":1}'}, {"a": entry()})
        (file,) = area.path.glob("env-*.json")
        file.write_bytes(b'{"x":2}')  # same length, different CRC
        assert subscriber.poll() is None
        assert subscriber.changed()  # retried on the next poll


def test_area_too_small_fails_clearly_and_keeps_what_is_published(area: Area) -> None:
    with Publisher(area.path, max_bytes=4096) as publisher, Subscriber(area.path) as subscriber:
        publisher.publish({"a": b"x" * 1000}, {"a": entry()})
        with pytest.raises(AreaError, match=r"shared_memory_max_bytes.*--shm-size"):
            publisher.publish({"a": b"y" * 5000}, {"a": entry()})
        _, documents = subscriber.poll()
        assert documents == {"a": b"x" * 1000}
        assert publisher.generation == 1


def test_a_restarted_publisher_resumes_the_generation(area: Area) -> None:
    with Publisher(area.path) as first:
        first.publish({"a": b"{}"}, {"a": entry()})
        first.publish({}, {"a": entry()})
    with Publisher(area.path) as second:
        manifest = second.resume()
        assert manifest is not None and manifest.generation == 2
        assert second.read_document(manifest.environments["a"]) == b"{}"
        assert second.publish({}, {"a": entry()}) == 3


def test_an_area_in_use_is_refused(area: Area) -> None:
    with pytest.raises(AreaError, match="in use by a running edge-proxy"):
        Area(area.path).create()


def test_a_dead_instances_leftovers_are_cleaned(tmp_path: Path) -> None:
    path = Path("/dev/shm") / f"edge-proxy-test.{os.getpid()}.leftover"
    path.mkdir()
    (path / "lock").write_text("999999")  # nobody holds its lock: its owner is dead
    (path / "env-stale-1.json").write_text("{}")
    area = Area(path)
    try:
        area.create()
        assert not (path / "env-stale-1.json").exists()
        assert (path / "control").exists()
    finally:
        area.remove()
    assert not path.exists()


# -- torture: one writer at a high rate, several readers verifying every document they get -----------


def _document(generation: int, size: int) -> bytes:
    body = (f"{generation}:" * (size // 8 + 1)).encode()[:size]
    return body + hashlib.sha256(body).hexdigest().encode()


def _verify(data: bytes) -> bool:
    body, digest = data[:-64], data[-64:]
    return hashlib.sha256(body).hexdigest().encode() == digest


def _writer(path: str, seconds: float, result: multiprocessing.Queue) -> None:
    publisher = Publisher(Path(path))
    deadline = time.monotonic() + seconds
    count = 0
    while time.monotonic() < deadline:
        count += 1
        size = 1000 + (count * 7919) % 200_000
        entries = {"a": entry("a"), "b": entry("b")}
        publisher.publish({"a": _document(count, size), "b": _document(-count, size // 2)}, entries)
    result.put(("writer", count))


def _reader(path: str, seconds: float, result: multiprocessing.Queue) -> None:
    subscriber = Subscriber(Path(path))
    deadline = time.monotonic() + seconds
    reads = torn = retries = 0
    while time.monotonic() < deadline:
        if not subscriber.changed():
            continue
        polled = subscriber.poll()
        if polled is None:
            retries += 1
            continue
        for data in polled[1].values():
            reads += 1
            torn += not _verify(data)
    result.put(("reader", reads, torn, retries))


def test_no_torn_reads_under_a_fast_writer(area: Area) -> None:
    context = multiprocessing.get_context("spawn")  # readers attach by path, as spawned workers do
    result = context.Queue()
    seconds = 4.0
    processes = [context.Process(target=_writer, args=(str(area.path), seconds, result))]
    processes += [context.Process(target=_reader, args=(str(area.path), seconds + 0.5, result)) for _ in range(3)]
    for process in processes:
        process.start()
    outcomes = [result.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    writes = next(o[1] for o in outcomes if o[0] == "writer")
    readers = [o for o in outcomes if o[0] == "reader"]
    assert writes > 500, writes
    assert all(reads > 100 for _, reads, _, _ in readers), readers
    assert sum(torn for _, _, torn, _ in readers) == 0, readers
    print(f"\ntorture: {writes} publications, readers (reads, torn, retries): {[r[1:] for r in readers]}")


def test_an_area_without_room_refuses_to_start(tmp_path: Path) -> None:
    path = Path("/dev/shm") / f"edge-proxy-test.{os.getpid()}.full"
    with pytest.raises(AreaError, match=r"is full \(\d+ KiB free\): raise the size.*--shm-size"):
        Area(path, min_free_bytes=2**60).create()  # more than any /dev/shm has
    assert not path.exists()  # nothing left behind


def test_a_restarted_publisher_cleans_up_what_a_killed_one_left(area: Area) -> None:
    with Publisher(area.path) as first:
        first.publish({"a": b"1"}, {"a": entry()})
        first.publish({"a": b"2"}, {"a": entry()})  # generation 1's file is kept one publication longer
    (area.path / ".env-x-3.json.999.tmp").write_bytes(b"half")  # killed mid-write
    with Publisher(area.path) as second:
        second.resume()
        assert not list(area.path.glob(".*.tmp"))
        second.publish({"a": b"3"}, {"a": entry()})
        second.publish({}, {"a": entry()})
        second.publish({}, {"a": entry()})
        with Subscriber(area.path) as subscriber:
            assert subscriber.poll()[1] == {"a": b"3"}
    assert len(list(area.path.glob("env-*.json"))) == 1


# What a leader before the typed manifest wrote (generation 41, one environment published, one not yet).
OLD_MANIFEST = {
    "generation": 41,
    "environments": {
        "client_a": {
            "server_keys": {"ser.a": None, "ser.a2": 1900000000.0},
            "name": "Production",
            "updated_at": "2024-05-01T10:00:00+00:00",
            "last_success": 1714557600.5,
            "last_error": None,
            "error_kind": None,
            "file": "env-0123456789abcdef-41.json",
            "length": 2,
            "crc32": 2745614147,
        },
        "client_b": {
            "server_keys": {"ser.b": None},
            "name": None,
            "updated_at": None,
            "last_success": None,
            "last_error": "HTTP 503 from upstream",
            "error_kind": "http_status",
        },
    },
    "meta": {"discovered_at": 1714557500.0},
}


def as_written_now(old: dict[str, Any], generation: int) -> dict[str, Any]:
    """An earlier manifest as this version writes it: the fields added since (`environment_id`) as null."""
    environments = {key: {**entry, "environment_id": None} for key, entry in old["environments"].items()}
    return {**old, "generation": generation, "environments": environments}


def test_the_manifest_json_form_is_what_earlier_leaders_wrote() -> None:
    manifest = Manifest.from_json(OLD_MANIFEST)
    a, b = manifest.environments["client_a"], manifest.environments["client_b"]
    assert a.location == Location("env-0123456789abcdef-41.json", 2, 2745614147)
    assert a.server_keys == {"ser.a": None, "ser.a2": 1900000000.0}
    assert (b.location, b.error_kind, manifest.discovered_at) == (None, "http_status", 1714557500.0)
    assert manifest.to_json() == as_written_now(OLD_MANIFEST, 41)  # and back, field for field
    # fields a later version adds are ignored; missing ones take their defaults
    newer = Manifest.from_json({"generation": 3, "environments": {"c": {"file": "f", "future": 1}}, "x": 2})
    assert newer.environments["c"] == ManifestEntry(location=Location("f", 0, 0))
    assert newer.discovered_at is None


def test_a_leader_resumes_from_an_earlier_leaders_manifest(area: Area) -> None:
    (area.path / "env-0123456789abcdef-41.json").write_bytes(b"{}")
    (area.path / "manifest.json").write_bytes(orjson.dumps(OLD_MANIFEST))
    with Publisher(area.path) as publisher:
        manifest = publisher.resume()
        assert manifest is not None and publisher.generation == 41
        assert publisher.read_document(manifest.environments["client_a"]) == b"{}"
        assert publisher.read_document(manifest.environments["client_b"]) is None
        assert publisher.publish({}, manifest.environments, manifest.discovered_at) == 42
    republished = orjson.loads((area.path / "manifest.json").read_bytes())
    assert republished == as_written_now(OLD_MANIFEST, 42)  # the document kept, nothing rewritten


def test_a_worker_keeps_its_states_out_of_the_cyclic_collectors_sight(area: Area) -> None:
    import asyncio
    import gc

    import orjson

    from proxy.area.bodies import KeyKind
    from proxy.config.settings import Settings
    from proxy.evaluation.environment import answers_for
    from proxy.worker.environment import EnvironmentState
    from proxy.worker.store import Follower, Store
    from tests.support import conformance_documents

    document = orjson.dumps(conformance_documents()["ser.env_server_key_1"])
    # a state, once dropped, leaves no cyclic garbage: frozen states are still freed by reference counting
    gc.collect()
    dropped = EnvironmentState.of_document("env_client_key_1", document)
    dropped.identity_body(KeyKind.CLIENT, "u", [], {})  # and its evaluator
    del dropped
    assert gc.collect() == 0
    settings = Settings(
        environment_key_pairs=[{"server_side_key": "ser.env_server_key_1", "client_side_key": "env_client_key_1"}]
    )
    store = Store(settings)
    try:
        with Publisher(area.path) as publisher, Subscriber(area.path) as subscriber:
            client_key = "env_client_key_1"
            answers = {client_key: answers_for(document)}
            publisher.publish({client_key: document}, {client_key: entry(client_key)}, answers=answers)
            Follower(store, subscriber).load_now()
            state = store.states[client_key]
            assert not any(tracked is state for tracked in gc.get_objects())  # frozen: not walked
            asyncio.run(state.ready_for_identities())  # an evaluator built on first need is frozen too
            assert state.evaluator is not None and state.evaluator.compiled is not None
            compiled = state.evaluator.compiled
            assert not any(tracked is compiled for tracked in gc.get_objects())
    finally:
        gc.unfreeze()
