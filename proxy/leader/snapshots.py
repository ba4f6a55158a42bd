"""Persisted snapshots: each environment's last good document, so a cold start can serve during an outage.

A snapshot is one blob: a JSON header line, then the document bytes exactly as published. The header
names the format version, the environment (the hash of its client key, as shared-memory file names do),
the document's `updated_at` (microseconds since the epoch, for the version check), when it was saved, the
document's length, and a MAC: HMAC-SHA256 over those fields and the document, keyed by
HMAC-SHA256(server key, "edge-proxy snapshot v2"). The store never sees that key (nor the server key), so
whoever can write the directory or the Redis database cannot build a snapshot this proxy accepts: an
unauthenticated one (forged, corrupted, written by a version before format 2, or with a server key the
environment no longer has) is rejected, logged once, listed in /proxy/status and counted in
`edge_proxy_snapshots_rejected_total`. Nothing derived from a snapshot is ever sent upstream (the poller
sends no If-Modified-Since for a document restored from one), so a replayed old snapshot is replaced by
the first upstream answer.

Two stores:

* `DirectoryBackend`: `<dir>/<key hash>.snapshot`, written to a temporary file, fsynced, renamed, and the
  directory fsynced; a per-environment `flock` makes read-compare-replace safe when replicas share a volume.
  The directory is 0700 and every file 0600 (`proxy/leader/private_files.py`).
* `RedisBackend`: one hash per environment (`edge-proxy:snapshot:<key hash>`, field `blob`), replaced in a
  WATCH/MULTI transaction.

A store only compares and replaces: whether the stored blob may be kept (authentic and newer) is decided by
the caller, who holds the key. Stores are synchronous (the official `redis` client, plain file I/O); the
leader calls them in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from proxy.area.names import key_hash
from proxy.config.masking import mask_key, mask_url, mask_urls_in
from proxy.config.settings import Settings
from proxy.leader.private_files import open_private, prepare_directory, write_private
from proxy.metrics import prometheus as metrics

if TYPE_CHECKING:
    import redis  # imported when a Redis is configured (redis_client)

log = logging.getLogger("proxy.leader")

FORMAT_VERSION = 2
KEY_CONTEXT = b"edge-proxy snapshot v2"  # what the snapshot key is derived with (and only for this)
SUFFIX = ".snapshot"
PENDING_PREFIX = "pending-"  # counts kept across a restart (proxy/supervisor/pending_counts.py)
# what the proxy writes in snapshot_dir (private_files: a directory holding only these is ours to tighten)
OWN_FILES = (f"*{SUFFIX}", "*.lock", ".*.tmp", f"{PENDING_PREFIX}*.json", f".{PENDING_PREFIX}*")
REDIS_PREFIX = "edge-proxy:snapshot:"
REDIS_TIMEOUT = 2.0  # seconds: a hung Redis must not hold a restore for long
READ_RETRY_AFTER = 30.0  # seconds: after a failed read, others are not tried (1,000 environments × timeout)


class SnapshotError(Exception):
    """A snapshot that cannot be used; the message says why, `kind` is a short category (metrics label)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Snapshot:
    client_key: str
    document: bytes
    updated_at_us: int  # the document's updated_at in µs since the epoch (0 when it has none)
    saved_at: float  # wall-clock seconds


def updated_at_us(updated_at: datetime | None) -> int:
    return int(updated_at.timestamp() * 1_000_000) if updated_at is not None else 0


def snapshot_key(server_key: str) -> bytes:
    """The MAC key: derived from the server key, so neither is ever written to the store."""
    return hmac.new(server_key.encode(), KEY_CONTEXT, hashlib.sha256).digest()


def _mac(key: bytes, environment: str, updated_at: int, saved_at: float, document: bytes) -> str:
    # every header field the reader acts on, then the document; the length is implied by the document
    signed = f"{FORMAT_VERSION}\n{environment}\n{updated_at}\n{saved_at!r}\n{len(document)}\n".encode()
    return hmac.new(key, signed + document, hashlib.sha256).hexdigest()


def encode(snapshot: Snapshot, server_key: str) -> bytes:
    environment = key_hash(snapshot.client_key)
    header = {
        "format": FORMAT_VERSION,
        "environment": environment,
        "updated_at_us": snapshot.updated_at_us,
        "saved_at": snapshot.saved_at,
        "length": len(snapshot.document),
        "mac": _mac(
            snapshot_key(server_key), environment, snapshot.updated_at_us, snapshot.saved_at, snapshot.document
        ),
    }
    return orjson.dumps(header) + b"\n" + snapshot.document


def decode(client_key: str, server_keys: Iterable[str], blob: bytes) -> Snapshot:
    """The snapshot in `blob`, authenticated with one of the environment's `server_keys`, or SnapshotError."""
    head, newline, document = blob.partition(b"\n")
    if not newline:
        raise SnapshotError("truncated (no header line)", "truncated")
    try:
        header = orjson.loads(head)
    except orjson.JSONDecodeError:
        raise SnapshotError("unreadable header", "unreadable") from None
    if not isinstance(header, dict):
        raise SnapshotError("unreadable header", "unreadable")
    version = header.get("format")
    if version == 1:
        raise SnapshotError(
            "format version 1 is not authenticated (written before snapshots were signed); replaced at the next save",
            "unauthenticated",
        )
    if version != FORMAT_VERSION:
        raise SnapshotError(f"format version {version!r}, this proxy reads {FORMAT_VERSION}", "version")
    environment = key_hash(client_key)
    if header.get("environment") != environment:
        raise SnapshotError("written for another environment", "environment")
    if header.get("length") != len(document):
        raise SnapshotError(f"truncated ({len(document)} of {header.get('length')} bytes)", "truncated")
    try:
        updated_at, saved_at, mac = int(header["updated_at_us"]), float(header["saved_at"]), str(header["mac"])
    except (KeyError, TypeError, ValueError):
        raise SnapshotError("unreadable header", "unreadable") from None
    for server_key in server_keys:  # during a key rotation, a snapshot signed with either key is good
        if hmac.compare_digest(mac, _mac(snapshot_key(server_key), environment, updated_at, saved_at, document)):
            return Snapshot(client_key, document, updated_at, saved_at)
    raise SnapshotError(
        "not authenticated: forged, corrupted, or written with a server key this environment no longer has",
        "unauthenticated",
    )


class SnapshotBackend(Protocol):
    kind: str
    location: str  # safe to show (credentials masked)

    def load(self, client_key: str) -> bytes | None:
        """The stored blob, or None when there is none; OSError / redis errors when the store fails."""
        ...

    def save(self, client_key: str, blob: bytes, keep: Callable[[bytes], bool]) -> bool:
        """Store `blob` unless `keep(stored blob)` says the stored one stays; True when written."""
        ...

    def close(self) -> None: ...


class DirectoryBackend:
    kind = "directory"

    def __init__(self, directory: Path, report: bool = True) -> None:
        self.directory = directory
        self.location = str(directory)
        prepare_directory(directory, OWN_FILES, "snapshot_dir", report)

    def _path(self, client_key: str) -> Path:
        return self.directory / f"{key_hash(client_key)}{SUFFIX}"

    def load(self, client_key: str) -> bytes | None:
        try:
            return self._path(client_key).read_bytes()
        except FileNotFoundError:
            return None

    def save(self, client_key: str, blob: bytes, keep: Callable[[bytes], bool]) -> bool:
        path = self._path(client_key)
        lock = open_private(path.with_suffix(".lock"), os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # replicas sharing the directory compare and replace in turn
            with contextlib.suppress(FileNotFoundError):
                if keep(path.read_bytes()):
                    return False
            write_private(path, blob, fsync=True)
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


def redis_client(url: str) -> redis.Redis:
    """A blocking client of the snapshot Redis, bytes in and out, every call bounded by REDIS_TIMEOUT (also
    what the main process keeps pending counts in: proxy/supervisor/pending_counts.py)."""
    import redis

    return redis.Redis.from_url(
        url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT, decode_responses=False
    )


class RedisBackend:
    kind = "redis"

    def __init__(self, url: str) -> None:
        self.location = mask_url(url)
        self.client = redis_client(url)

    def load(self, client_key: str) -> bytes | None:
        blob = self.client.hget(REDIS_PREFIX + key_hash(client_key), "blob")
        return blob.encode() if isinstance(blob, str) else blob  # bytes: decode_responses is off

    def save(self, client_key: str, blob: bytes, keep: Callable[[bytes], bool]) -> bool:
        from redis.exceptions import WatchError

        key = REDIS_PREFIX + key_hash(client_key)
        with self.client.pipeline() as pipe:
            while True:  # optimistic: another replica's write between our read and our write retries
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]  # untyped in redis-py
                    stored = pipe.hget(key, "blob")
                    if isinstance(stored, bytes) and keep(stored):
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.delete(key)  # fields of older formats (updated_at) go with it
                    pipe.hset(key, "blob", blob)
                    pipe.execute()
                    return True
                except WatchError:
                    continue

    def close(self) -> None:
        self.client.close()


def make_store(settings: Settings, report: bool = True) -> SnapshotBackend | None:
    """The configured store; `report: False` for the leader, whose directory the main process reported on."""
    if settings.snapshot_redis:
        return RedisBackend(settings.snapshot_redis)
    if settings.snapshot_dir:
        return DirectoryBackend(Path(settings.snapshot_dir), report)
    return None


class Snapshots:
    """The leader's use of a store: restore at start, save on change, and a status for /proxy/status."""

    def __init__(self, store: SnapshotBackend) -> None:
        self.store = store
        self.restored = 0
        self.written = 0
        self.skipped_older = 0
        self.last_write: float | None = None
        self.last_error: str | None = None  # the store itself failing (unreachable, not writable)
        self.rejected: dict[str, str] = {}  # masked client key → why its snapshot was not used
        self._read_failed_at: float | None = None

    async def restore(self, client_key: str, server_keys: Iterable[str]) -> Snapshot | None:
        """The authenticated snapshot of `client_key`, or None (none stored, store failing, or rejected: logged)."""
        return await asyncio.to_thread(self.restore_now, client_key, list(server_keys))

    def restore_now(self, client_key: str, server_keys: Iterable[str]) -> Snapshot | None:
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
            snapshot = decode(client_key, server_keys, blob)
        except SnapshotError as exc:
            self.reject(client_key, str(exc), exc.kind)
            return None
        self.restored += 1
        self.rejected.pop(mask_key(client_key), None)
        return snapshot

    def reject(self, client_key: str, reason: str, kind: str) -> None:
        """Report a snapshot not used: once per environment and reason, whoever (preload, leader) saw it first."""
        masked = mask_key(client_key)
        if self.rejected.get(masked) == reason:
            return
        self.rejected[masked] = reason
        metrics.SNAPSHOTS_REJECTED.labels(reason=kind).inc()
        log.error("snapshot of environment %s skipped: %s", masked, reason)

    async def save(
        self, client_key: str, server_keys: Sequence[str], document: bytes, updated_at: datetime | None
    ) -> bool:
        """Write a changed document; False when the store failed (the caller retries after its next poll)."""
        snapshot = Snapshot(client_key, document, updated_at_us(updated_at), time.time())
        try:
            written = await asyncio.to_thread(self.save_now, snapshot, server_keys)
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

    def save_now(self, snapshot: Snapshot, server_keys: Sequence[str]) -> bool:
        """Store `snapshot` signed with the first of `server_keys` unless the store holds a newer authentic
        one (any of the keys authenticates it); True when written. Store errors are raised."""

        def keep(stored: bytes) -> bool:
            # only an authentic newer snapshot stays: a forged one's updated_at must not block real saves
            try:
                return decode(snapshot.client_key, server_keys, stored).updated_at_us > snapshot.updated_at_us
            except SnapshotError:
                return False

        return self.store.save(snapshot.client_key, encode(snapshot, server_keys[0]), keep)

    def _failed(self, action: str, client_key: str, exc: Exception) -> None:
        text = mask_urls_in(str(exc))
        self.last_error = f"{action} failed: {type(exc).__name__}: {text}"
        log.error(
            "snapshot store %s: %s of environment %s failed: %s",
            self.store.location,
            action,
            mask_key(client_key),
            text,
        )

    def adopt(self, previous: dict[str, Any] | None) -> None:
        """Continue the counts of whoever published before us (the preload, or a previous leader)."""
        if previous:
            self.restored = previous.get("restored", 0)
            self.written = previous.get("written", 0)
            self.skipped_older = previous.get("skipped_older", 0)
            self.last_write = previous.get("last_write")
            self.rejected = dict(previous.get("rejected") or {})

    def report(self) -> dict[str, Any]:
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
    if not (settings.snapshot_dir or settings.snapshot_redis):
        return
    from proxy.area.control import AreaError
    from proxy.area.manifest import ManifestEntry
    from proxy.area.publication import Publisher
    from proxy.evaluation.environment import answers_for

    try:
        snapshots = Snapshots(make_store(settings))  # type: ignore[arg-type]
    except Exception as exc:
        log.error("snapshot store unavailable, starting without snapshots: %s", mask_urls_in(str(exc)))
        return
    documents: dict[str, bytes] = {}
    answers: dict[str, bytes] = {}
    entries: dict[str, ManifestEntry] = {}
    now = time.time()
    try:
        for pair in settings.environment_key_pairs:
            snapshot = snapshots.restore_now(pair.client_side_key, [pair.server_side_key])
            if snapshot is None:
                continue
            try:
                document = orjson.loads(snapshot.document)
                updated_at = document.get("updated_at")  # the leader parses it when it takes over
                if not isinstance(document, dict):
                    raise TypeError("not a JSON object")
                answers[pair.client_side_key] = answers_for(snapshot.document)  # and one a worker can serve
            except Exception as exc:  # authentic bytes, but not a document: skip it like a corrupt one
                snapshots.reject(pair.client_side_key, f"not a document: {exc}", "not_document")
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
            publisher.publish(documents, entries, None, {"snapshots": snapshots.report()}, answers)
    except AreaError as exc:
        log.error("snapshots not published before start: %s", exc)
    finally:
        snapshots.close()
    if documents:
        log.info("serving %d environment(s) from snapshots until upstream answers", len(documents))
