"""Persisted snapshots and /proxy/status: real proxies, the fake Flagsmith API, a real `redis-server`.

An outage at start is an upstream that answers 503 (or nothing at all); the proxy must serve from the
snapshot store within 2 s of its start, say so in health, and switch to upstream at its first good answer.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.area.publication import key_hash
from proxy.leader.snapshots import (
    DirectoryBackend,
    RedisBackend,
    Snapshot,
    SnapshotBackend,
    SnapshotError,
    Snapshots,
    decode,
    encode,
)
from tests.fake_upstream import FakeFlagsmith
from tests.support import EDGE_PROXY, KEYS, ProxyProcess, conformance_documents, free_port, proxy_config, wait_for

CLIENT_1 = {"X-Environment-Key": "env_client_key_1"}
SERVER_1 = {"X-Environment-Key": "ser.env_server_key_1"}
SERVER_KEY_1 = "ser.env_server_key_1"
FAST = {"api_poll_frequency_seconds": 0.5}
SERVE_WITHIN = 2.0  # seconds from start to serving from a snapshot (the bound)


class RedisServer:
    """`redis-server` on a free 127.0.0.1 port, no persistence, in its own directory; stopped by pid."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.url = f"redis://127.0.0.1:{self.port}/0"
        workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                *(["--requirepass", password] if password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port, password=password)
        assert wait_for(lambda: self._pings(client), 10), "redis-server did not start"
        client.close()

    @staticmethod
    def _pings(client: Any) -> bool:
        with contextlib.suppress(Exception):
            return bool(client.ping())
        return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def needs_redis_server() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip(
            "redis-server is not installed (make test installs it with apt-get: `apt-get install redis-server`)"
        )


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    needs_redis_server()
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def store_settings(kind: str, tmp_path: Path, redis_server: RedisServer | None) -> dict[str, Any]:
    if kind == "directory":
        return {"snapshot_dir": str(tmp_path / "snapshots")}
    assert redis_server is not None
    return {"snapshot_redis_url": redis_server.url}


@pytest.fixture(params=["directory", "redis"])
def store_kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, RedisServer | None]]:
    if request.param == "redis":
        yield "redis", request.getfixturevalue("redis_server")
    else:
        yield "directory", None


def stored_count(kind: str, tmp_path: Path, redis_server: RedisServer | None) -> int:
    if kind == "directory":
        return len(list((tmp_path / "snapshots").glob("*.snapshot")))
    import redis

    client = redis.Redis(port=redis_server.port, password=redis_server.password)  # type: ignore[union-attr]
    try:
        return len(client.keys("edge-proxy:snapshot:*"))
    finally:
        client.close()


def health_sources(proxy: ProxyProcess) -> set[str | None]:
    health = proxy.get("/proxy/health").json()
    if "sources" not in health:  # left out, as the Python proxy's body, while everything is from upstream
        statuses = proxy.get("/proxy/status").json()["environments"].values()
        assert {entry["source"] for entry in statuses} == {"upstream"}
        return {"upstream"}
    return {entry["source"] for entry in health["sources"]}


def serves_everything(proxy: ProxyProcess) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        flags = proxy.get("/api/v1/flags/", headers=CLIENT_1)
        identity = proxy.get("/api/v1/identities/?identifier=snapshot-user", headers=CLIENT_1)
        document = proxy.get("/api/v1/environment-document/", headers=SERVER_1)
        other = proxy.get("/api/v1/flags/", headers={"X-Environment-Key": "env_client_key_2"})
        return all(r.status_code == 200 for r in (flags, identity, document, other))
    return False


def within(healthy_start: float) -> float:
    """2 s, or on a machine so loaded that even a start with upstream up takes longer, no slower than that."""
    return max(SERVE_WITHIN, healthy_start + 0.5)


def start_and_time(proxy: ProxyProcess) -> float:
    """Start `proxy`, return the seconds until it serves flags, identities and the document."""
    started = time.monotonic()
    proxy.start()
    assert wait_for(lambda: serves_everything(proxy), 20, 0.02), proxy.log()
    return time.monotonic() - started


def test_restart_during_an_outage_serves_the_snapshot(
    tmp_path: Path, store_kind: tuple[str, RedisServer | None]
) -> None:
    kind, redis_server = store_kind
    upstream = FakeFlagsmith(conformance_documents()).start()
    config = proxy_config(upstream.api_url, **FAST, **store_settings(kind, tmp_path, redis_server))
    try:
        first = ProxyProcess(tmp_path / "first", config)
        try:
            healthy = start_and_time(first)  # the same machine's start with upstream up, for comparison
            first.wait_ready()
            expected = {
                "flags": first.get("/api/v1/flags/", headers=CLIENT_1).json(),
                "identity": first.get("/api/v1/identities/?identifier=snapshot-user", headers=CLIENT_1).json(),
                "document": first.get("/api/v1/environment-document/", headers=SERVER_1).json(),
            }
            assert wait_for(lambda: stored_count(kind, tmp_path, redis_server) == 2, 10), first.log()
        finally:
            first.stop()

        upstream.fail = 503  # the outage
        second = ProxyProcess(tmp_path / "second", config)
        try:
            elapsed = start_and_time(second)
            print(f"\n[{kind}] start to serving: from the snapshot {elapsed:.2f} s, from upstream {healthy:.2f} s")
            assert elapsed < within(healthy), f"served after {elapsed:.2f} s\n{second.log()}"
            assert second.get("/api/v1/flags/", headers=CLIENT_1).json() == expected["flags"]
            identity = second.get("/api/v1/identities/?identifier=snapshot-user", headers=CLIENT_1).json()
            assert identity == expected["identity"]
            assert second.get("/api/v1/environment-document/", headers=SERVER_1).json() == expected["document"]
            health = second.get("/proxy/health/readiness")
            assert health.status_code == 200, health.text
            assert {e["source"] for e in health.json()["sources"]} == {"snapshot"}
            assert all(e["age_seconds"] is not None and e["age_seconds"] >= 0 for e in health.json()["sources"])
            assert "from snapshots until upstream answers" in second.log()
            # the server key never appears in the store
            assert not any(key in store_dump(kind, tmp_path, redis_server) for key in KEYS)

            # upstream back, with a change: its first good answer replaces the snapshot
            enabled = upstream.toggle("ser.env_server_key_1", "show_banner")
            upstream.fail = None
            assert wait_for(lambda: health_sources(second) == {"upstream"}, 15), second.log()
            banner = second.get("/api/v1/flags/?feature=show_banner", headers=CLIENT_1).json()
            assert banner["enabled"] is enabled
            status = second.get("/proxy/status").json()
            assert status["proxy"]["snapshot_store"]["kind"] == kind
            assert status["proxy"]["snapshot_store"]["restored"] == 2
            # ... and the changed document is written back to the store
            assert wait_for(lambda: second.get("/proxy/status").json()["proxy"]["snapshot_store"]["written"] >= 1, 10)
        finally:
            second.stop()
    finally:
        upstream.stop()


def store_dump(kind: str, tmp_path: Path, redis_server: RedisServer | None) -> str:
    if kind == "directory":
        names = [p.name for p in (tmp_path / "snapshots").iterdir()]
        return "\n".join(names + [p.read_text() for p in (tmp_path / "snapshots").glob("*.snapshot")])
    import redis

    client = redis.Redis(port=redis_server.port)  # type: ignore[union-attr]
    try:
        keys = client.keys("*")
        return "\n".join([k.decode() for k in keys] + [str(v) for k in keys for v in client.hgetall(k).values()])
    finally:
        client.close()


def test_two_proxies_share_one_store(tmp_path: Path, store_kind: tuple[str, RedisServer | None]) -> None:
    kind, redis_server = store_kind
    shared = store_settings(kind, tmp_path, redis_server)
    upstream = FakeFlagsmith(conformance_documents()).start()
    writer = ProxyProcess(tmp_path / "writer", proxy_config(upstream.api_url, **FAST, **shared))
    # the second replica cannot reach upstream at all (nothing listens on that port)
    unreachable = f"http://127.0.0.1:{free_port()}/api/v1"
    reader = ProxyProcess(tmp_path / "reader", proxy_config(unreachable, **FAST, **shared))
    try:
        healthy = start_and_time(writer)
        writer.wait_ready()
        assert wait_for(lambda: stored_count(kind, tmp_path, redis_server) == 2, 10), writer.log()
        elapsed = start_and_time(reader)
        print(f"\n[{kind}, shared] start to serving: from the snapshot {elapsed:.2f} s, from upstream {healthy:.2f} s")
        assert elapsed < within(healthy), reader.log()
        assert (
            reader.get("/api/v1/flags/", headers=CLIENT_1).json()
            == writer.get("/api/v1/flags/", headers=CLIENT_1).json()
        )
        assert reader.get("/proxy/health/readiness").status_code == 200
        assert health_sources(reader) == {"snapshot"}
        assert health_sources(writer) == {"upstream"}
        # the reader's own fetches fail: interrupted, still serving the snapshot
        assert wait_for(lambda: env_status(reader)["state"] == "interrupted", 10), reader.log()
        assert env_status(reader)["source"] == "snapshot"
        assert reader.get("/proxy/health/readiness").status_code == 200
    finally:
        reader.stop()
        writer.stop()
        upstream.stop()


# -- corrupt snapshots ------------------------------------------------------------------------------


def good_snapshot(client_key: str = "env_client_key_1") -> Snapshot:
    document = conformance_documents()["ser.env_server_key_1"]
    return Snapshot(client_key, orjson.dumps(document), 1_700_000_000_000_000, time.time())


def corrupt(blob: bytes, how: str) -> bytes:
    if how == "truncated":
        return blob[: len(blob) - 100]
    if how == "flipped":
        at = len(blob) - 10  # one byte of the document changed
        return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]
    assert how == "version"
    head, _, document = blob.partition(b"\n")
    header = orjson.loads(head)
    header["format"] = 99
    return orjson.dumps(header) + b"\n" + document


def format_1(snapshot: Snapshot) -> bytes:
    """A snapshot as versions before authentication wrote it: anyone can build one (a SHA-256, no key)."""
    header = {
        "format": 1,
        "environment": key_hash(snapshot.client_key),
        "updated_at_us": snapshot.updated_at_us,
        "saved_at": snapshot.saved_at,
        "length": len(snapshot.document),
        "sha256": hashlib.sha256(snapshot.document).hexdigest(),
    }
    return orjson.dumps(header) + b"\n" + snapshot.document


@pytest.mark.parametrize(
    ("how", "reason"),
    [("truncated", "truncated"), ("flipped", "not authenticated"), ("version", "format version 99")],
)
def test_a_corrupt_snapshot_is_refused(how: str, reason: str) -> None:
    blob = encode(good_snapshot(), SERVER_KEY_1)
    assert decode("env_client_key_1", [SERVER_KEY_1], blob).document == good_snapshot().document
    with pytest.raises(SnapshotError, match=reason):
        decode("env_client_key_1", [SERVER_KEY_1], corrupt(blob, how))
    with pytest.raises(SnapshotError, match="another environment"):
        decode("env_client_key_2", ["ser.env_server_key_2"], blob)


def test_only_the_server_key_authenticates_a_snapshot() -> None:
    snapshot = good_snapshot()
    blob = encode(snapshot, SERVER_KEY_1)
    assert SERVER_KEY_1.encode() not in blob  # the key is never written, only a MAC keyed by a key derived from it
    with pytest.raises(SnapshotError, match="not authenticated") as refused:
        decode("env_client_key_1", ["ser.another_server_key"], blob)
    assert refused.value.kind == "unauthenticated"
    # during a rotation either key is good
    assert decode("env_client_key_1", ["ser.another_server_key", SERVER_KEY_1], blob).document == snapshot.document
    # a header changed by someone who can write the store but has no key: a later updated_at, same document
    head, _, document = blob.partition(b"\n")
    header = orjson.loads(head)
    header["updated_at_us"] += 10**15
    with pytest.raises(SnapshotError, match="not authenticated"):
        decode("env_client_key_1", [SERVER_KEY_1], orjson.dumps(header) + b"\n" + document)
    # the unauthenticated format of earlier versions is refused, whatever its checksum says
    with pytest.raises(SnapshotError, match="format version 1 is not authenticated") as old:
        decode("env_client_key_1", [SERVER_KEY_1], format_1(snapshot))
    assert old.value.kind == "unauthenticated"


def test_corrupt_snapshots_are_skipped_and_reported(start_proxy: Callable[..., ProxyProcess], tmp_path: Path) -> None:
    directory = tmp_path / "snapshots"
    store = DirectoryBackend(directory)
    documents = conformance_documents()
    for (server_key, client_key), how in zip(KEYS.items(), ["truncated", "flipped"], strict=True):
        snapshot = Snapshot(client_key, orjson.dumps(documents[server_key]), 1, time.time())
        (directory / f"{key_hash(client_key)}.snapshot").write_bytes(corrupt(encode(snapshot, server_key), how))
    assert store.load("env_client_key_1") is not None
    unreachable = f"http://127.0.0.1:{free_port()}/api/v1"
    proxy = start_proxy(proxy_config(unreachable, **FAST, snapshot_dir=str(directory)))
    proxy.wait_live()
    assert wait_for(lambda: "snapshot of environment en…_2 skipped" in proxy.log(), 10), proxy.log()
    assert wait_for(lambda: len(proxy.get("/proxy/status").json()["proxy"]["snapshot_store"]["rejected"]) == 2, 5)
    # never served: nothing is loaded, readiness fails
    assert proxy.get("/api/v1/flags/", headers=CLIENT_1).status_code == 503
    assert proxy.get("/proxy/health/readiness").status_code == 503
    rejected = proxy.get("/proxy/status").json()["proxy"]["snapshot_store"]["rejected"]
    assert rejected["en…_1"].startswith("truncated")
    assert rejected["en…_2"].startswith("not authenticated")
    # the leader tries them again once it runs (the main process saw them first): still one line each
    assert wait_for(lambda: proxy.leader_pid() is not None and "leader started" in proxy.log(), 20), proxy.log()
    time.sleep(1.0)
    log = proxy.log()
    assert log.count("snapshot of environment en…_1 skipped") == 1, log
    assert log.count("snapshot of environment en…_2 skipped") == 1, log
    assert rejections(proxy) == {"truncated": 1.0, "unauthenticated": 1.0}


def rejections(proxy: ProxyProcess) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in proxy.get("/metrics").text.splitlines():
        if line.startswith("edge_proxy_snapshots_rejected_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            found[reason] = float(line.rsplit(" ", 1)[1])
    return found


def write_raw(kind: str, tmp_path: Path, redis_server: RedisServer | None, client_key: str, blob: bytes) -> None:
    """What someone who can write the store (not the proxy) puts there."""
    if kind == "directory":
        directory = tmp_path / "snapshots"
        directory.mkdir(exist_ok=True)
        (directory / f"{key_hash(client_key)}.snapshot").write_bytes(blob)
        return
    import redis

    client = redis.Redis(port=redis_server.port)  # type: ignore[union-attr]
    try:  # as the earlier format kept it: updated_at beside the blob, for the "not older" check
        updated_at = orjson.loads(blob.partition(b"\n")[0])["updated_at_us"]
        client.hset(f"edge-proxy:snapshot:{key_hash(client_key)}", mapping={"updated_at": updated_at, "blob": blob})
    finally:
        client.close()


def read_raw(kind: str, tmp_path: Path, redis_server: RedisServer | None, client_key: str) -> bytes | None:
    if kind == "directory":
        return DirectoryBackend(tmp_path / "snapshots").load(client_key)
    store = RedisBackend(redis_server.url)  # type: ignore[union-attr]
    try:
        return store.load(client_key)
    finally:
        store.close()


def test_a_forged_snapshot_is_refused(tmp_path: Path, store_kind: tuple[str, RedisServer | None]) -> None:
    kind, redis_server = store_kind
    documents = conformance_documents()
    upstream = FakeFlagsmith(documents).start()
    future = int(datetime(2100, 1, 1, tzinfo=UTC).timestamp() * 1_000_000)
    forged_documents = {}
    for server_key, client_key in KEYS.items():
        forged = copy.deepcopy(documents[server_key])
        for state in forged["feature_states"]:
            state["enabled"] = not state["enabled"]  # every flag the other way round
        forged["updated_at"] = "2100-01-01T00:00:00+00:00"
        forged_documents[client_key] = orjson.dumps(forged)
    # environment 1: the earlier, unauthenticated format (a SHA-256 anyone can compute);
    # environment 2: the current format, signed with a key that is not the environment's
    snapshot_1 = Snapshot("env_client_key_1", forged_documents["env_client_key_1"], future, time.time())
    write_raw(kind, tmp_path, redis_server, "env_client_key_1", format_1(snapshot_1))
    snapshot_2 = Snapshot("env_client_key_2", forged_documents["env_client_key_2"], future, time.time())
    write_raw(kind, tmp_path, redis_server, "env_client_key_2", encode(snapshot_2, "ser.a_guessed_key"))
    proxy = ProxyProcess(
        tmp_path / "proxy", proxy_config(upstream.api_url, **FAST, **store_settings(kind, tmp_path, redis_server))
    )
    try:
        proxy.start()
        proxy.wait_ready()
        # never served, never sent upstream as If-Modified-Since: the proxy serves upstream's flags
        for server_key in KEYS:
            served = proxy.get("/api/v1/flags/", headers={"X-Environment-Key": server_key}).json()
            expected = {s["feature"]["name"]: s["enabled"] for s in documents[server_key]["feature_states"]}
            assert {flag["feature"]["name"]: flag["enabled"] for flag in served} == expected
        for server_key in KEYS:
            assert next(r for r in upstream.requests if r["key"] == server_key)["ims"] is None
        status = proxy.get("/proxy/status").json()
        assert {entry["source"] for entry in status["environments"].values()} == {"upstream"}
        rejected = status["proxy"]["snapshot_store"]["rejected"]
        assert rejected["en…_1"].startswith("format version 1 is not authenticated"), rejected
        assert rejected["en…_2"].startswith("not authenticated"), rejected
        assert rejections(proxy) == {"unauthenticated": 2.0}
        assert proxy.log().count("snapshot of environment en…_1 skipped") == 1
        # the legitimate saves replace the forged snapshots (their later updated_at holds nothing back)
        for server_key, client_key in KEYS.items():

            def replaced(client_key: str = client_key, server_key: str = server_key) -> bool:
                blob = read_raw(kind, tmp_path, redis_server, client_key)
                with contextlib.suppress(SnapshotError):
                    return blob is not None and decode(client_key, [server_key], blob).updated_at_us < future
                return False

            assert wait_for(replaced, 10), proxy.log()
        assert wait_for(lambda: proxy.get("/proxy/status").json()["proxy"]["snapshot_store"]["written"] == 2, 5)
    finally:
        proxy.stop()
        upstream.stop()


def test_after_a_restore_the_first_fetch_is_unconditional(tmp_path: Path) -> None:
    upstream = FakeFlagsmith(conformance_documents()).start()
    config = proxy_config(upstream.api_url, **FAST, snapshot_dir=str(tmp_path / "snapshots"))
    first = ProxyProcess(tmp_path / "first", config)
    second = ProxyProcess(tmp_path / "second", config)
    try:
        first.start()
        first.wait_ready()
        assert wait_for(lambda: stored_count("directory", tmp_path, None) == 2, 10), first.log()
        first.stop()
        before = len(upstream.requests)
        second.start()
        second.wait_ready()
        assert wait_for(lambda: health_sources(second) == {"upstream"}, 10), second.log()
        assert second.get("/proxy/status").json()["proxy"]["snapshot_store"]["restored"] == 2
        # the snapshot's date is never sent: the first answer after the restore is upstream's whole document
        for server_key in KEYS:
            asked = [r for r in upstream.requests[before:] if r["key"] == server_key]
            assert asked and asked[0]["ims"] is None, asked[:2]
        # later polls are conditional again, on what upstream itself answered
        assert wait_for(lambda: any(r["ims"] for r in upstream.requests[before:]), 5)
        assert not any(r["inm"] for r in upstream.requests)  # Flagsmith's API sends no ETag: dates only
    finally:
        second.stop()
        first.stop()
        upstream.stop()


# -- file modes ---------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_snapshot_files_are_private_whatever_the_umask(
    start_proxy: Callable[..., ProxyProcess], upstream: FakeFlagsmith, tmp_path: Path
) -> None:
    directory = tmp_path / "volume" / "snapshots"
    previous = os.umask(0)  # the proxy inherits the widest umask there is
    try:
        proxy = start_proxy(proxy_config(upstream.api_url, **FAST, snapshot_dir=str(directory)))
    finally:
        os.umask(previous)
    proxy.wait_ready()
    assert wait_for(lambda: len(list(directory.glob("*.snapshot"))) == 2, 10), proxy.log()
    assert mode(directory) == 0o700
    files = list(directory.iterdir())
    assert {path.suffix for path in files} == {".snapshot", ".lock"}
    assert {path.name: mode(path) for path in files} == {path.name: 0o600 for path in files}


def test_an_existing_snapshot_dir_is_tightened_when_it_is_ours(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # what an earlier version left: the directory 0755, a snapshot and its lock 0644
    ours = tmp_path / "ours"
    ours.mkdir()
    os.chmod(ours, 0o755)
    for name in (f"{key_hash('env_client_key_1')}.snapshot", f"{key_hash('env_client_key_1')}.lock"):
        (ours / name).write_bytes(b"old")
        os.chmod(ours / name, 0o644)
    with caplog.at_level("INFO", logger="proxy.leader"):
        DirectoryBackend(ours)
    assert mode(ours) == 0o700
    assert {mode(path) for path in ours.iterdir()} == {0o600}
    assert "mode 0755 tightened to 0700" in caplog.text

    # a directory shared with something else is the operator's: left as it is, with one warning
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o775)
    (shared / "notes.txt").write_text("someone else's")
    os.chmod(shared / "notes.txt", 0o644)
    caplog.clear()
    with caplog.at_level("INFO", logger="proxy.leader"):
        store = DirectoryBackend(shared)
        DirectoryBackend(shared, report=False)  # the leader, after the main process reported it
    assert mode(shared) == 0o775 and mode(shared / "notes.txt") == 0o644
    assert caplog.text.count("is mode 0775 (it holds files the proxy did not write): left as it is") == 1
    assert Snapshots(store).save_now(good_snapshot(), [SERVER_KEY_1])
    assert {path.name: mode(path) for path in shared.iterdir() if path.name != "notes.txt"} == {
        f"{key_hash('env_client_key_1')}.snapshot": 0o600,
        f"{key_hash('env_client_key_1')}.lock": 0o600,
    }


# -- the version check ------------------------------------------------------------------------------


def check_never_older(store: SnapshotBackend) -> None:
    snapshots = Snapshots(store)
    keys = [SERVER_KEY_1]

    def stored() -> bytes:
        blob = store.load("env_client_key_1")
        assert blob is not None
        return decode("env_client_key_1", keys, blob).document

    newer = good_snapshot()
    older = Snapshot(newer.client_key, b'{"older":true}', newer.updated_at_us - 1, time.time())
    assert snapshots.save_now(newer, keys) is True
    assert snapshots.save_now(older, keys) is False
    assert stored() == newer.document
    same_age = Snapshot(newer.client_key, newer.document + b" ", newer.updated_at_us, time.time())
    assert snapshots.save_now(same_age, keys) is True  # as new: the latest fetch wins
    newest = Snapshot(newer.client_key, b'{"newest":true}', newer.updated_at_us + 1, time.time())
    assert snapshots.save_now(newest, keys) is True
    assert stored() == b'{"newest":true}'
    # a newer snapshot that does not authenticate (another key's, or forged) does not hold a save back
    foreign = Snapshot(newer.client_key, b'{"foreign":true}', newer.updated_at_us + 10, time.time())
    assert Snapshots(store).save_now(foreign, ["ser.another_server_key"]) is True
    later = Snapshot(newer.client_key, b'{"later":true}', newer.updated_at_us + 2, time.time())
    assert snapshots.save_now(later, keys) is True
    assert stored() == b'{"later":true}'


def test_an_older_document_never_replaces_a_newer_one_in_a_directory(tmp_path: Path) -> None:
    store = DirectoryBackend(tmp_path / "snapshots")
    check_never_older(store)
    # written atomically: no temporary is left behind, and the file name is the key's hash
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir() if p.suffix == ".snapshot") == [
        f"{key_hash('env_client_key_1')}.snapshot"
    ]
    assert not list((tmp_path / "snapshots").glob(".*.tmp"))


def test_an_older_document_never_replaces_a_newer_one_in_redis(redis_server: RedisServer) -> None:
    store = RedisBackend(redis_server.url)
    try:
        check_never_older(store)
    finally:
        store.close()


def test_a_proxy_never_writes_an_older_document_over_a_newer_one(
    start_proxy: Callable[..., ProxyProcess], upstream: FakeFlagsmith, tmp_path: Path
) -> None:
    directory = tmp_path / "snapshots"
    store = DirectoryBackend(directory)
    proxy = start_proxy(proxy_config(upstream.api_url, **FAST, snapshot_dir=str(directory)))
    proxy.wait_ready()
    assert wait_for(lambda: len(list(directory.glob("*.snapshot"))) == 2, 10), proxy.log()
    # another replica (holding the server key) wrote a newer document than the one this proxy is about to fetch
    future = datetime(2100, 1, 1, tzinfo=UTC)
    newer = Snapshot("env_client_key_1", b'{"from":"the future"}', int(future.timestamp() * 1e6), time.time())
    assert Snapshots(store).save_now(newer, [SERVER_KEY_1])
    upstream.toggle("ser.env_server_key_1", "show_banner")  # a change upstream, older than that
    assert wait_for(lambda: "the store holds a newer one" in proxy.log(), 15), proxy.log()
    blob = store.load("env_client_key_1")
    assert blob is not None and decode("env_client_key_1", [SERVER_KEY_1], blob).document == newer.document


# -- /proxy/status ----------------------------------------------------------------------------------


def env_status(proxy: ProxyProcess, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return proxy.get("/proxy/status", headers=headers or {}).json()["environments"]["en…_1"]


def test_status_shows_each_transition(start_proxy: Callable[..., ProxyProcess], upstream: FakeFlagsmith) -> None:
    upstream.delay = 1.5  # the first answer takes a while: initializing
    token = {"Authorization": "Bearer s3cret-token"}
    proxy = start_proxy(proxy_config(upstream.api_url, **FAST, status_token="s3cret-token"))
    proxy.wait_live()
    unauthorized = proxy.get("/proxy/status")
    assert unauthorized.status_code == 401 and "status_token" in unauthorized.json()["message"]
    assert proxy.get("/proxy/status", headers={"Authorization": "Bearer wrong"}).status_code == 401

    seen = env_status(proxy, token)
    assert seen["state"] == "initializing" and seen["source"] is None and seen["size"] is None
    whole = proxy.get("/proxy/status", headers=token).json()["proxy"]
    assert whole["version"] and whole["workers"] == 1 and whole["leader_restarts"] == 0
    assert whole["snapshot_store"] == {"kind": None, "state": "disabled"}

    upstream.delay = 0
    assert wait_for(lambda: env_status(proxy, token)["state"] == "valid", 10), proxy.log()
    valid = env_status(proxy, token)
    assert valid["source"] == "upstream" and valid["last_200"] and valid["size"] > 100 and valid["generation"] >= 1
    assert valid["updated_at"] and valid["since"] and valid["last_error"] is None
    assert wait_for(lambda: env_status(proxy, token)["last_304"] is not None, 10)  # unchanged: 304s

    upstream.fail = 500
    assert wait_for(lambda: env_status(proxy, token)["state"] == "interrupted", 10), proxy.log()
    interrupted = env_status(proxy, token)
    assert interrupted["since"] > valid["since"]
    assert interrupted["last_error"]["kind"] and "500" in interrupted["last_error"]["message"]
    assert interrupted["source"] == "upstream"  # still serving the last good copy
    assert proxy.get("/api/v1/flags/", headers=CLIENT_1).status_code == 200

    upstream.fail = None
    assert wait_for(lambda: env_status(proxy, token)["state"] == "valid", 10), proxy.log()
    recovered = env_status(proxy, token)
    assert recovered["since"] > interrupted["since"] and recovered["last_error"] is None
    body = proxy.get("/proxy/status", headers=token).text
    assert "ser.env_server_key" not in body and "env_client_key_1" not in body  # keys masked

    # a leader killed and restarted by the watchdog is counted; it takes over the state it published
    leader = proxy.leader_pid()
    assert leader is not None
    os.kill(leader, signal.SIGKILL)
    restarted = lambda: proxy.get("/proxy/status", headers=token).json()["proxy"]["leader_restarts"] == 1  # noqa: E731
    assert wait_for(restarted, 15), proxy.log()
    assert env_status(proxy, token)["state"] == "valid"


def test_status_is_open_without_a_token_and_hides_error_texts(
    start_proxy: Callable[..., ProxyProcess], upstream: FakeFlagsmith
) -> None:
    upstream.fail = 500
    proxy = start_proxy(proxy_config(upstream.api_url, **FAST))
    proxy.wait_live()
    assert wait_for(lambda: env_status(proxy)["last_error"] is not None, 10), proxy.log()
    error = env_status(proxy)["last_error"]
    assert error["kind"] and error["message"] is None
    assert env_status(proxy)["state"] == "initializing"  # nothing served yet


def test_an_unreachable_redis_does_not_stop_serving(
    start_proxy: Callable[..., ProxyProcess], upstream: FakeFlagsmith
) -> None:
    nowhere = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    proxy = start_proxy(proxy_config(upstream.api_url, **FAST, snapshot_redis_url=nowhere))
    proxy.wait_ready()
    assert proxy.get("/api/v1/flags/", headers=CLIENT_1).status_code == 200
    assert wait_for(lambda: proxy.get("/proxy/status").json()["proxy"]["snapshot_store"]["state"] == "error", 10)
    store = proxy.get("/proxy/status").json()["proxy"]["snapshot_store"]
    assert store["kind"] == "redis" and store["last_error"] in ("read failed", "write failed")
    assert "hunter2" not in proxy.get("/proxy/status").text and "hunter2" not in proxy.log()


# -- readiness rules and settings (no processes) ----------------------------------------------------


def test_readiness_from_a_snapshot_is_bounded_and_configurable() -> None:
    from proxy.config.settings import Settings
    from proxy.http.health import check_health

    def settings(**health: Any) -> Settings:
        pairs = [{"server_side_key": server, "client_side_key": client} for server, client in KEYS.items()]
        return Settings(environment_key_pairs=pairs, health_check=health)

    now = 1_000_000.0
    from proxy.area.manifest import Location, ManifestEntry

    entry = ManifestEntry(location=Location("env-x-1.json", 1, 1), source="snapshot", snapshot_saved_at=now - 3600)
    status = {client: entry for client in KEYS.values()}
    code, body = check_health(settings(), list(KEYS.values()), status, {}, now)
    assert code == 200
    assert orjson.loads(body)["sources"] == [
        {"key": "en…_1", "source": "snapshot", "age_seconds": 3600.0},
        {"key": "en…_2", "source": "snapshot", "age_seconds": 3600.0},
    ]
    assert check_health(settings(snapshot_max_age_seconds=600), list(KEYS.values()), status, {}, now)[0] == 503
    assert check_health(settings(snapshot_counts_as_ready=False), list(KEYS.values()), status, {}, now)[0] == 503
    assert check_health(settings(snapshot_max_age_seconds=None), list(KEYS.values()), status, {}, now)[0] == 200


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"snapshot_dir": "/tmp/x", "snapshot_redis_url": "redis://127.0.0.1:1"}, "not both"),
        ({"snapshot_redis_url": "http://127.0.0.1:6379"}, "redis://"),
    ],
)
def test_snapshot_settings_are_checked(overrides: dict[str, Any], message: str) -> None:
    from pydantic import ValidationError

    from proxy.config.settings import Settings, masked_settings

    pairs = [{"server_side_key": "ser.abcdefgh", "client_side_key": "abcdefgh"}]
    with pytest.raises(ValidationError, match=message):
        Settings(environment_key_pairs=pairs, **overrides)
    masked = masked_settings(
        Settings(environment_key_pairs=pairs, snapshot_redis_url="redis://:pw@h:1/0", status_token="t0ken")
    )
    assert masked["snapshot_redis_url"] == "redis://***@h:1/0" and masked["status_token"] == "***"


REDIS_SECRET, API_SECRET, STREAM_SECRET = "redis-pw-4711", "api-pw-4712", "stream-pw-4713"


@pytest.mark.parametrize("form", ["query", "user-info"])
def test_no_url_credential_reaches_the_log_status_health_metrics_or_check_config(
    tmp_path: Path, upstream: FakeFlagsmith, form: str
) -> None:
    """A password in the Redis URL (`?password=` or `user:pw@`), user-info in api_url and upstream_stream_url:
    all used, none shown anywhere."""
    needs_redis_server()
    redis_server = RedisServer(tmp_path / "redis", password=REDIS_SECRET)
    base = f"127.0.0.1:{redis_server.port}/0"
    redis_url = (
        f"redis://{base}?password={REDIS_SECRET}" if form == "query" else f"redis://default:{REDIS_SECRET}@{base}"
    )
    api_url = upstream.api_url.replace("http://", f"http://api-user:{API_SECRET}@")
    stream_url = upstream.api_url.replace("http://", f"http://stream-user:{STREAM_SECRET}@").removesuffix("/api/v1")
    config = proxy_config(api_url, **FAST, snapshot_redis_url=redis_url, upstream_stream_url=stream_url)
    config["health_check"] = {"show_details": True}  # error texts included: they must be masked too
    proxy = ProxyProcess(tmp_path / "proxy", config).start()
    try:
        proxy.wait_ready()
        assert wait_for(lambda: stored_count("redis", tmp_path, redis_server) == 2, 10), proxy.log()  # the URL works
        status = proxy.get("/proxy/status").json()["proxy"]["snapshot_store"]
        masked = f"redis://{base}?password=***" if form == "query" else f"redis://***@{base}"
        assert status["state"] == "ok" and status["location"] == masked
        shown = {
            "log": proxy.log(),
            "status": proxy.get("/proxy/status").text,
            "health": proxy.get("/proxy/health").text + proxy.get("/proxy/health/readiness").text,
            "metrics": proxy.get("/metrics").text,
            "check-config": subprocess.run(
                [EDGE_PROXY, "check-config"], env=proxy.env, capture_output=True, text=True, timeout=60, check=True
            ).stdout,
        }
    finally:
        proxy.stop()
        redis_server.stop()
    shown["log"] = proxy.log()  # shutdown's lines too
    for where, text in shown.items():
        for secret in (REDIS_SECRET, API_SECRET, STREAM_SECRET):
            assert secret not in text, f"{secret} in {where}:\n{text}"
    printed = orjson.loads(shown["check-config"])["settings"]
    assert printed["api_url"].startswith("http://***@127.0.0.1:")
    assert printed["upstream_stream_url"].startswith("http://***@127.0.0.1:")
