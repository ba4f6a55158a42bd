"""Build once in the leader, share the bytes: the answers file, the shared mappings, evaluators on demand."""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import os
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks.documents import small_environment
from proxy.area import answers
from proxy.area.bodies import KeyKind
from proxy.area.manifest import ManifestEntry
from proxy.area.publication import Area, Publisher, Subscriber
from proxy.area.shared_bytes import SharedBytes
from proxy.evaluation.engine import as_flags, visible_to
from proxy.evaluation.environment import EvaluatedEnvironment, answers_for
from proxy.worker.environment import EnvironmentState
from proxy.worker.evaluators import Evaluators
from proxy.worker.store import build_states
from tests.support import EXAMPLES

DOCUMENTS = [json.loads((EXAMPLES / f"upstream_env{n}_document.json").read_text()) for n in (1, 2)]


@pytest.fixture
def area(tmp_path: Path) -> Iterator[Area]:
    created = Area(Path("/dev/shm") / f"edge-proxy-test.{os.getpid()}.{tmp_path.name}")
    created.create()
    yield created
    created.remove()


@pytest.mark.parametrize("document", DOCUMENTS, ids=["env1", "env2"])
def test_the_answers_are_what_each_key_kind_sees(document: dict[str, Any]) -> None:
    data = orjson.dumps(document)
    state = EnvironmentState.of_document("k", data)
    evaluated = EvaluatedEnvironment(data)
    for kind in KeyKind:
        visible, hide_disabled = evaluated.kinds[kind]
        flags = visible_to(as_flags(evaluated.results), visible, hide_disabled)
        body = state.flags(kind)
        assert body.plain == orjson.dumps(flags)
        assert body.gzip is None or gzip.decompress(body.gzip) == body.plain
        for flag in flags:
            single = state.flag(kind, flag["feature"]["name"])
            assert single is not None and single.plain == orjson.dumps(flag)
    assert set(state.feature_names) == set(evaluated.features)
    assert state.document.plain == data and gzip.decompress(state.document.gzip or b"") == data
    assert state.environment_id == document["id"]
    assert state.last_modified == b"Wed, 01 May 2024 12:00:00 GMT"


def test_a_large_single_flag_is_compressed_too() -> None:
    document = DOCUMENTS[0] | {
        "feature_states": [dict(DOCUMENTS[0]["feature_states"][0], feature_state_value="x" * 2000)]
    }
    state = EnvironmentState.of_document("k", orjson.dumps(document))
    single = state.flag(KeyKind.SERVER, "show_banner")
    assert single is not None and single.gzip is not None and gzip.decompress(single.gzip) == single.plain


def test_an_answers_file_of_another_format_is_refused() -> None:
    data = bytearray(answers_for(orjson.dumps(DOCUMENTS[0])))
    data[8] = 99  # the format number
    with pytest.raises(answers.AnswersError):
        answers.Header.parse(bytes(data))


def test_shared_bytes_hold_no_descriptor(tmp_path: Path) -> None:
    files = []
    for i in range(50):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(b"%d:" % i * 1000)
    before = len(os.listdir("/proc/self/fd"))
    mapped = [SharedBytes(path) for path in files]
    assert len(os.listdir("/proc/self/fd")) == before  # mmap.mmap would hold one per file on Python < 3.13
    assert mapped[7].slice(0, 4) == b"7:7:" and mapped[7].bytes() == files[7].read_bytes()
    assert mapped[7].slice(len(mapped[7]) - 1, 100) == b":"  # clipped to the file
    import zlib

    assert mapped[3].crc32() == zlib.crc32(files[3].read_bytes())
    assert SharedBytes(_empty(tmp_path)).bytes() == b""


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").write_bytes(b"")
    return tmp_path / "empty"


def publish(area: Area, count: int) -> tuple[Subscriber, dict[str, bytes]]:
    documents = {f"client_{i}": orjson.dumps(small_environment(i)) for i in range(count)}
    entries = {key: ManifestEntry(server_keys={f"ser.{key}": None}) for key in documents}
    with Publisher(area.path) as publisher:
        publisher.publish(documents, entries, answers={key: answers_for(data) for key, data in documents.items()})
    return Subscriber(area.path), documents


def test_a_worker_serves_from_the_leaders_answers_and_holds_little_per_environment(area: Area) -> None:
    count = 500
    subscriber, documents = publish(area, count)
    gc.collect()
    tracemalloc.start()
    update = subscriber.read()
    assert update is not None
    published = update.published
    assert all(files.answers is not None for files in published.values())
    before = tracemalloc.get_traced_memory()[0]
    states, _ = build_states(published, {})
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # an EnvironmentState built by the worker itself held about 110 KiB for such a document
    assert held / count < 1024, f"{held / count:.0f} bytes per environment"
    state = states["client_7"]
    assert state.document.plain == documents["client_7"]
    assert orjson.loads(state.flags(KeyKind.CLIENT).plain)[0]["feature"]["name"] == "show_banner"
    assert state.evaluator is None
    subscriber.close()


def test_an_evaluator_is_built_on_first_need_once_and_bounded() -> None:
    evaluators = Evaluators(max_size=2)
    states = [EnvironmentState.of_document(f"c{i}", orjson.dumps(small_environment(i)), evaluators) for i in range(3)]

    async def scenario() -> None:
        cold = states[0]
        started = time.perf_counter()
        await asyncio.gather(*(cold.ready_for_identities() for _ in range(20)))  # concurrent first requests
        elapsed = time.perf_counter() - started
        assert evaluators.built == 1 and cold.evaluator is not None
        assert elapsed < 0.05, f"cold environment's evaluator took {elapsed * 1000:.1f} ms"
        assert b'"identifier":"u"' in cold.identity_body(KeyKind.CLIENT, "u", [], {})
        await states[1].ready_for_identities()
        await states[0].ready_for_identities()  # used again: now the most recent
        await states[2].ready_for_identities()  # beyond the bound: the least recently used (1) goes
        assert states[1].evaluator is None and states[0].evaluator is not None and len(evaluators) == 2

    asyncio.run(scenario())


def test_a_kept_evaluator_is_rebuilt_ahead_when_its_document_changes(area: Area) -> None:
    from proxy.worker.store import Follower, Store
    from tests.inprocess import settings_for

    store = Store(settings_for(), area.path)
    with Publisher(area.path) as publisher, Subscriber(area.path) as subscriber:
        documents = {"env_client_key_1": orjson.dumps(DOCUMENTS[0]), "env_client_key_2": orjson.dumps(DOCUMENTS[1])}
        entries = {key: ManifestEntry(server_keys={f"ser.{key}": None}) for key in documents}
        publisher.publish(documents, entries, answers={key: answers_for(data) for key, data in documents.items()})
        follower = Follower(store, subscriber)

        async def scenario() -> None:
            follower.load_now()
            await store.states["env_client_key_1"].ready_for_identities()  # served identities: kept
            changed = {key: data.replace(b'"Development"', b'"Dev"') for key, data in documents.items()}
            publisher.publish(changed, entries, answers={key: answers_for(data) for key, data in changed.items()})
            await follower.follow()

        asyncio.run(scenario())
    assert store.states["env_client_key_1"].evaluator is not None  # built with the new document
    assert store.states["env_client_key_2"].evaluator is None  # never asked for identities: not built
    assert len(store.evaluators) == 1
