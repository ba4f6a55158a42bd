"""Persisted snapshots: each environment's last good document, so a cold start can serve during an outage.

A snapshot is one blob: a JSON header line, then the document bytes exactly as published. The header
names the format version, the environment (the hash of its client key, as shared-memory file names do),
the document's `updated_at` (microseconds since the epoch, for the version check), when it was saved, and
the document's length and SHA-256. Nothing else: the server key is never written anywhere.

Two stores:

* `DirectoryStore`: `<dir>/<key hash>.snapshot`, written to a temporary file, fsynced, renamed, and the
  directory fsynced; a per-environment `flock` makes read-compare-replace safe when replicas share a volume.
* `RedisStore`: one hash per environment (`edge-proxy:snapshot:<key hash>`, fields `updated_at` and
  `blob`), replaced by a Lua script only when the stored `updated_at` is not newer.

Stores are synchronous (the official `redis` client, plain file I/O); the leader calls them in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from proxy.area.publication import key_hash
from proxy.config.settings import Settings, mask_key, mask_url

log = logging.getLogger("proxy.leader")

FORMAT_VERSION = 1
SUFFIX = ".snapshot"
REDIS_PREFIX = "edge-proxy:snapshot:"
REDIS_TIMEOUT = 2.0  # seconds: a hung Redis must not hold a restore for long
READ_RETRY_AFTER = 30.0  # seconds: after a failed read, others are not tried (1,000 environments × timeout)


class SnapshotError(Exception):
    """A snapshot that cannot be used (unreadable, truncated, wrong checksum or version); the message says why."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    client_key: str
    document: bytes
    updated_at_us: int  # the document's updated_at in µs since the epoch (0 when it has none)
    saved_at: float  # wall-clock seconds


def updated_at_us(updated_at: datetime | None) -> int:
    return int(updated_at.timestamp() * 1_000_000) if updated_at is not None else 0


def encode(snapshot: Snapshot) -> bytes:
    header = {
        "format": FORMAT_VERSION,
        "environment": key_hash(snapshot.client_key),
        "updated_at_us": snapshot.updated_at_us,
        "saved_at": snapshot.saved_at,
        "length": len(snapshot.document),
        "sha256": hashlib.sha256(snapshot.document).hexdigest(),
    }
    return orjson.dumps(header) + b"\n" + snapshot.document


def decode(client_key: str, blob: bytes) -> Snapshot:
    """The snapshot in `blob`, verified, or SnapshotError."""
    head, newline, document = blob.partition(b"\n")
    if not newline:
        raise SnapshotError("truncated (no header line)")
    try:
        header = orjson.loads(head)
    except orjson.JSONDecodeError:
        raise SnapshotError("unreadable header") from None
    if not isinstance(header, dict):
        raise SnapshotError("unreadable header")
    if header.get("format") != FORMAT_VERSION:
        raise SnapshotError(f"format version {header.get('format')!r}, this proxy reads {FORMAT_VERSION}")
    if header.get("environment") != key_hash(client_key):
        raise SnapshotError("written for another environment")
    if header.get("length") != len(document):
        raise SnapshotError(f"truncated ({len(document)} of {header.get('length')} bytes)")
    if header.get("sha256") != hashlib.sha256(document).hexdigest():
        raise SnapshotError("checksum mismatch")
    try:
        return Snapshot(client_key, document, int(header["updated_at_us"]), float(header["saved_at"]))
    except (KeyError, TypeError, ValueError):
        raise SnapshotError("unreadable header") from None


class SnapshotStore(Protocol):
    kind: str
    location: str  # safe to show (credentials masked)

    def load(self, client_key: str) -> bytes | None:
        """The stored blob, or None when there is none; OSError / redis errors when the store fails."""
        ...

    def save(self, snapshot: Snapshot) -> bool:
        """Store `snapshot` unless a newer one is there; True when written."""
        ...

    def close(self) -> None: ...


def _stored_updated_at(blob: bytes) -> int | None:
    with contextlib.suppress(orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
        return int(orjson.loads(blob.partition(b"\n")[0])["updated_at_us"])
    return None  # unreadable: anything may replace it


class DirectoryStore:
    kind = "directory"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.location = str(directory)
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, client_key: str) -> Path:
        return self.directory / f"{key_hash(client_key)}{SUFFIX}"

    def load(self, client_key: str) -> bytes | None:
        try:
            return self._path(client_key).read_bytes()
        except FileNotFoundError:
            return None

    def save(self, snapshot: Snapshot) -> bool:
        path = self._path(snapshot.client_key)
        lock = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # replicas sharing the directory compare and replace in turn
            with contextlib.suppress(FileNotFoundError):
                stored = _stored_updated_at(path.read_bytes())
                if stored is not None and stored > snapshot.updated_at_us:
                    return False
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                with open(tmp, "wb") as out:
                    out.write(encode(snapshot))
                    out.flush()
                    os.fsync(out.fileno())
                os.rename(tmp, path)
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a crash
            finally:
                os.close(directory)
            return True
        finally:
            os.close(lock)

    def close(self) -> None:
        pass


# KEYS[1]: the environment's hash; ARGV: updated_at (µs), blob. Replaces unless the stored one is newer.
_SAVE_IF_NOT_OLDER = """
local stored = redis.call('HGET', KEYS[1], 'updated_at')
if stored and tonumber(stored) > tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1], 'blob', ARGV[2])
return 1
"""


class RedisStore:
    kind = "redis"

    def __init__(self, url: str) -> None:
        import redis

        self.location = mask_url(url)
        self.client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT, decode_responses=False
        )
        self._save = self.client.register_script(_SAVE_IF_NOT_OLDER)

    def load(self, client_key: str) -> bytes | None:
        blob = self.client.hget(REDIS_PREFIX + key_hash(client_key), "blob")
        return blob.encode() if isinstance(blob, str) else blob  # bytes: decode_responses is off

    def save(self, snapshot: Snapshot) -> bool:
        key = REDIS_PREFIX + key_hash(snapshot.client_key)
        return bool(self._save(keys=[key], args=[snapshot.updated_at_us, encode(snapshot)]))

    def close(self) -> None:
        self.client.close()


def make_store(settings: Settings) -> SnapshotStore | None:
    if settings.snapshot_redis_url:
        return RedisStore(settings.snapshot_redis_url)
    if settings.snapshot_dir:
        return DirectoryStore(Path(settings.snapshot_dir))
    return None


class Snapshots:
    """The leader's use of a store: restore at start, save on change, and a status for /proxy/status."""

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self.restored = 0
        self.written = 0
        self.skipped_older = 0
        self.last_write: float | None = None
        self.last_error: str | None = None  # the store itself failing (unreachable, not writable)
        self.rejected: dict[str, str] = {}  # masked client key → why its snapshot was not used
        self._read_failed_at: float | None = None

    async def restore(self, client_key: str) -> Snapshot | None:
        """The verified snapshot of `client_key`, or None (none stored, store failing, or corrupt: logged)."""
        return await asyncio.to_thread(self.restore_now, client_key)

    def restore_now(self, client_key: str) -> Snapshot | None:
        failed_at = self._read_failed_at
        if failed_at is not None and time.monotonic() - failed_at < READ_RETRY_AFTER:
            return None  # the store just failed: do not wait for it once per environment
        try:
            blob = self.store.load(client_key)
        except Exception as exc:  # OSError, redis errors: the store is unavailable, serve without it
            self._read_failed_at = time.monotonic()
            self._failed("read", client_key, exc)
            return None
        self._read_failed_at = None
        if blob is None:
            return None
        try:
            snapshot = decode(client_key, blob)
        except SnapshotError as exc:
            self.rejected[mask_key(client_key)] = str(exc)
            log.error("snapshot of environment %s skipped: %s", mask_key(client_key), exc)
            return None
        self.restored += 1
        self.rejected.pop(mask_key(client_key), None)
        return snapshot

    async def save(self, client_key: str, document: bytes, updated_at: datetime | None) -> bool:
        """Write a changed document; False when the store failed (the caller retries after its next poll)."""
        snapshot = Snapshot(client_key, document, updated_at_us(updated_at), time.time())
        try:
            written = await asyncio.to_thread(self.store.save, snapshot)
        except Exception as exc:
            self._failed("write", client_key, exc)
            return False
        self.last_error = None
        if written:
            self.written += 1
            self.last_write = snapshot.saved_at
        else:
            self.skipped_older += 1
            log.info("snapshot of environment %s not written: the store holds a newer one", mask_key(client_key))
        return True

    def _failed(self, action: str, client_key: str, exc: Exception) -> None:
        self.last_error = f"{action} failed: {type(exc).__name__}: {exc}"
        log.error(
            "snapshot store %s: %s of environment %s failed: %s", self.store.location, action, mask_key(client_key), exc
        )

    def adopt(self, previous: dict[str, Any] | None) -> None:
        """Continue the counts of whoever published before us (the preload, or a previous leader)."""
        if previous:
            self.restored = previous.get("restored", 0)
            self.written = previous.get("written", 0)
            self.skipped_older = previous.get("skipped_older", 0)
            self.last_write = previous.get("last_write")
            self.rejected = dict(previous.get("rejected") or {})

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.store.kind,
            "location": self.store.location,
            "state": "error" if self.last_error else "ok",
            "last_error": self.last_error,
            "restored": self.restored,
            "written": self.written,
            "skipped_older": self.skipped_older,
            "last_write": self.last_write,
            "rejected": self.rejected,
        }

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.store.close()


def preload(settings: Settings, area: Path) -> None:
    """In the main process, before the workers and the leader start: publish the configured environments'
    snapshots, so the workers' first load serves them. The leader takes them over (`Poller.resume`)."""
    if not (settings.snapshot_dir or settings.snapshot_redis_url):
        return
    from proxy.area.manifest import ManifestEntry
    from proxy.area.publication import AreaError, Publisher

    try:
        snapshots = Snapshots(make_store(settings))  # type: ignore[arg-type]
    except Exception as exc:
        log.error("snapshot store unavailable, starting without snapshots: %s", exc)
        return
    documents: dict[str, bytes] = {}
    entries: dict[str, ManifestEntry] = {}
    now = time.time()
    try:
        for pair in settings.environment_key_pairs:
            snapshot = snapshots.restore_now(pair.client_side_key)
            if snapshot is None:
                continue
            try:
                document = orjson.loads(snapshot.document)
                updated_at = document.get("updated_at")  # the leader parses it when it takes over
                if not isinstance(document, dict):
                    raise TypeError("not a JSON object")
            except Exception as exc:  # verified bytes, but not a document: skip it like a corrupt one
                snapshots.rejected[mask_key(pair.client_side_key)] = f"not a document: {exc}"
                log.error("snapshot of environment %s skipped: not a document", mask_key(pair.client_side_key))
                continue
            documents[pair.client_side_key] = snapshot.document
            entries[pair.client_side_key] = ManifestEntry(
                server_keys={pair.server_side_key: None},
                name=document.get("name") if isinstance(document.get("name"), str) else None,
                environment_id=document.get("id") if isinstance(document.get("id"), int) else None,
                updated_at=updated_at if isinstance(updated_at, str) else None,
                source="snapshot",
                state="initializing",
                state_since=now,
                snapshot_saved_at=snapshot.saved_at,
            )
        with Publisher(area, settings.shared_memory_max_bytes) as publisher:
            publisher.publish(documents, entries, None, {"snapshots": snapshots.status()})
    except AreaError as exc:
        log.error("snapshots not published before start: %s", exc)
    finally:
        snapshots.close()
    if documents:
        log.info("serving %d environment(s) from snapshots until upstream answers", len(documents))
