"""Publication of environment documents from the leader to the workers through a shared-memory area.

The protocol is write-then-rename, with a generation counter in an mmap for the cheap check:

* The area is a directory on a tmpfs (default `/dev/shm/edge-proxy.<port>`), created by the main process.
  No `multiprocessing.shared_memory`, so no resource tracker can unlink it when an attacher exits
  (gh-82300 on Python 3.11/3.12), and workers attach by path, never by inheritance.
* Each published document is an immutable file `env-<key hash>-<generation>.json`. Changing one of 1,000
  environments writes one file. A document is written to a temporary name and renamed into place.
* `manifest.json` lists every environment: keys, the file, its length and CRC32, and the leader's health
  status for it (`proxy/area/manifest.py` defines it, for both sides). It is replaced atomically by rename,
  so a reader sees the old manifest or the new one, never a mix.
* `control` is a 4 KiB mmap whose second u64 is the published generation, stored after the rename.
  A worker's "anything new?" check is one aligned 8-byte read from it (tens of ns). The third u64 is the
  leader's heartbeat (`time.monotonic_ns()`, system-wide on Linux), which the supervisor watches.

Why not a seqlock over one big mmap: Python exposes no memory fences, so on weakly ordered CPUs (arm64)
a seqlock reader can observe the counter before the data. Here every data access is a syscall (rename,
open, read), which the kernel orders on every CPU. Readers still verify: the manifest carries its own
generation (a reader that sees the counter before the rename retries) and every document's CRC32 and
length are checked on every read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import shutil
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

from proxy.area.manifest import Location, Manifest, ManifestEntry
from proxy.area.names import (
    CONTROL,
    LOCK,
    MANIFEST,
    METRICS,
    PUBLISHED_GLOB,
    answers_file,
    document_file,
    temporary,
)
from proxy.area.names import key_hash as key_hash
from proxy.area.shared_bytes import SharedBytes

CONTROL_SIZE = 4096
MAGIC = 0x45445052_4F585931  # "EDPROXY1"
_MAGIC, _GENERATION, _HEARTBEAT = 0, 1, 2
# Refuse to start when the area has less room than this: a few documents must fit.
MIN_FREE_BYTES = 4 * 1024 * 1024


class AreaError(Exception):
    """The area cannot be created or written (too small, in use, not writable); the message says why."""


def full_message(path: Path, free: int | None = None) -> str:
    room = f" ({free // 1024} KiB free)" if free is not None else ""
    return (
        f"shared-memory area {path} is full{room}: raise the size of its filesystem "
        "(docker run --shm-size=256m, or a Kubernetes emptyDir with medium: Memory and a larger sizeLimit) "
        "or set shared_memory_dir to a larger tmpfs"
    )


class Area:
    """The area's lifetime, owned by the main process: create (cleaning a dead predecessor's), remove."""

    def __init__(self, path: Path, min_free_bytes: int = MIN_FREE_BYTES) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self._lock_fd: int | None = None

    def create(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            raise AreaError(f"shared_memory_dir {parent} does not exist")
        if self.path.exists():
            self._take_over_leftover()
        try:
            self.path.mkdir(mode=0o700)
            self._lock_fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(self._lock_fd, str(os.getpid()).encode())
            stats = os.statvfs(self.path)
            free = stats.f_bavail * stats.f_frsize
            if free < self.min_free_bytes:
                raise AreaError(full_message(self.path, free))
            with open(self.path / CONTROL, "wb") as control:
                control.write(bytes(CONTROL_SIZE))
            with open(self.path / CONTROL, "r+b") as control:
                mm = mmap.mmap(control.fileno(), CONTROL_SIZE)
                words = memoryview(mm).cast("Q")
                words[_MAGIC] = MAGIC
                words.release()
                mm.close()
            (self.path / METRICS).mkdir()
        except AreaError:
            self.remove()
            raise
        except OSError as exc:
            self.remove()
            if exc.errno == errno.ENOSPC:
                raise AreaError(full_message(self.path)) from None
            raise AreaError(f"cannot create shared-memory area {self.path}: {exc}") from None

    def _take_over_leftover(self) -> None:
        """A directory already there: another live instance (refuse) or a killed one's leftovers (remove)."""
        lock = self.path / LOCK
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            self._remove_leftover()
            return
        except PermissionError:
            raise AreaError(self._not_ours()) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AreaError(
                f"shared-memory area {self.path} is in use by a running edge-proxy (pid {owner}); "
                "use another port or shared_memory_dir"
            ) from None
        os.close(fd)
        self._remove_leftover()

    def _remove_leftover(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.path.exists():
            raise AreaError(self._not_ours())

    def _not_ours(self) -> str:
        try:
            owner = f"uid {self.path.stat().st_uid}"
        except OSError:
            owner = "another user"
        return (
            f"shared-memory area {self.path} exists and cannot be taken over (owned by {owner}, we are uid "
            f"{os.getuid()}): remove it, or use another port or shared_memory_dir"
        )

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class Publisher:
    """The leader's side. Not thread-safe: one leader, one writer."""

    def __init__(self, path: Path, max_bytes: int | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._file = open(path / CONTROL, "r+b")  # noqa: SIM115 - kept open for the writer's lifetime
        self._mm = mmap.mmap(self._file.fileno(), CONTROL_SIZE)
        self._words = memoryview(self._mm).cast("Q")
        if self._words[_MAGIC] != MAGIC:
            raise AreaError(f"{path / CONTROL} is not an edge-proxy control file")
        self.generation = self._words[_GENERATION]
        self._published: dict[str, Location] = {}  # client key → where its current document is
        self._answers: dict[str, Location] = {}  # client key → where its current document's answers are
        self._previous_files: set[str] = set()
        self._current_files: set[str] = set()

    def resume(self) -> Manifest | None:
        """The last published manifest (a restarted leader continues from it), or None."""
        manifest = read_manifest(self.path)
        if manifest is not None:
            self.generation = max(self.generation, manifest.generation)
            self._published = {
                key: entry.location for key, entry in manifest.environments.items() if entry.location is not None
            }
            self._answers = {
                key: entry.answers
                for key, entry in manifest.environments.items()
                if entry.answers is not None and entry.location is not None
            }
            self._current_files = _files_of(self._published, self._answers)
        # A killed leader may have left older documents and half-written temporaries: the next
        # publication removes the documents (readers may still be on them now), the temporaries go now.
        self._previous_files = {p.name for p in self.path.glob(PUBLISHED_GLOB)} - self._current_files
        for tmp in self.path.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        return manifest

    def beat(self) -> None:
        """The leader is alive and its loop turns: called from the event loop every HEARTBEAT_EVERY."""
        self._words[_HEARTBEAT] = time.monotonic_ns()

    def read_document(self, entry: ManifestEntry) -> bytes | None:
        return read_verified(self.path, entry.location)

    def has_answers(self, client_key: str) -> bool:
        """Are the answers of `client_key`'s published document published too (resuming an older leader's
        publication: not always)?"""
        return client_key in self._answers

    def publish(
        self,
        documents: Mapping[str, bytes],
        environments: Mapping[str, ManifestEntry],
        discovered_at: float | None = None,
        extra: Mapping[str, Any] | None = None,
        answers: Mapping[str, bytes] | None = None,
    ) -> int:
        """Write the changed `documents` (client key → bytes) and their `answers` (client key → the answers
        file, `proxy/area/answers.py`; a document without them gets none), then the manifest of all
        `environments`.

        `environments` maps client key → the leader's status for it; the publisher sets where each
        environment's document and answers are. An environment left out is no longer published.
        On failure nothing already published is touched.
        """
        generation = self.generation + 1
        answers = answers or {}
        self._check_room(sum(len(data) + len(answers.get(key, b"")) for key, data in documents.items()))
        published = {key: self._published[key] for key in environments if key in self._published}
        answered = {key: self._answers[key] for key in published if key in self._answers}
        written: list[Path] = []
        try:
            for client_key, data in documents.items():
                published[client_key] = self._write(document_file(client_key, generation), data, written)
                answered.pop(client_key, None)
                if client_key in answers:
                    name = answers_file(client_key, generation)
                    answered[client_key] = self._write(name, answers[client_key], written)
            manifest = Manifest(
                generation,
                {
                    key: replace(status, location=published.get(key), answers=answered.get(key))
                    for key, status in environments.items()
                },
                discovered_at,
                dict(extra or {}),
            )
            _write_atomic(self.path / MANIFEST, manifest.to_bytes())
        except OSError as exc:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            if exc.errno == errno.ENOSPC:
                raise AreaError(full_message(self.path)) from None
            raise AreaError(f"cannot publish to {self.path}: {exc}") from None
        self._words[_GENERATION] = generation
        self.generation = generation
        self._published, self._answers = published, answered
        current = _files_of(published, answered)
        # Keep the previous generation's files: a reader may have read the old manifest a moment ago.
        for stale in self._previous_files - current - self._current_files:
            with contextlib.suppress(OSError):
                (self.path / stale).unlink()
        self._previous_files, self._current_files = self._current_files, current
        return generation

    def _write(self, name: str, data: bytes, written: list[Path]) -> Location:
        _write_atomic(self.path / name, data)
        written.append(self.path / name)
        return Location(name, len(data), zlib.crc32(data))

    def _check_room(self, needed: int) -> None:
        """Refuse before writing anything: a half-done publication must not push out what is published."""
        stats = os.statvfs(self.path)
        free = stats.f_bavail * stats.f_frsize
        if needed > free:
            raise AreaError(full_message(self.path, free))
        if self.max_bytes is not None:
            used = sum(entry.stat().st_size for entry in self.path.glob(PUBLISHED_GLOB))
            if used + needed > self.max_bytes:
                raise AreaError(
                    f"shared-memory area {self.path} would exceed shared_memory_max_bytes "
                    f"({used + needed} > {self.max_bytes} bytes): raise shared_memory_max_bytes and the size of "
                    "its filesystem (docker run --shm-size, or a Kubernetes emptyDir with medium: Memory)"
                )

    def close(self) -> None:
        self._words.release()
        self._mm.close()
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _files_of(*published: Mapping[str, Location]) -> set[str]:
    return {location.file for locations in published for location in locations.values()}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = temporary(path)
    try:
        with open(tmp, "wb") as out:
            out.write(data)
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_manifest(path: Path) -> Manifest | None:
    try:
        return Manifest.from_bytes((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None


def read_verified(path: Path, location: Location | None) -> bytes | None:
    """The document at `location`, or None when there is none, it is gone or it fails its length or CRC check."""
    if location is None:
        return None
    try:
        data = (path / location.file).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) != location.length or zlib.crc32(data) != location.crc32:
        return None
    return data


class Heartbeat:
    """The supervisor's view of the leader's heartbeat word."""

    def __init__(self, path: Path) -> None:
        with open(path / CONTROL, "rb") as control:
            self._mm = mmap.mmap(control.fileno(), CONTROL_SIZE, access=mmap.ACCESS_READ)
        self._words = memoryview(self._mm).cast("Q")

    def read(self) -> int:
        """The last beat, `time.monotonic_ns()` in the leader; 0 before any leader beat."""
        return int(self._words[_HEARTBEAT])

    def close(self) -> None:
        self._words.release()
        self._mm.close()


@dataclass(frozen=True, slots=True)
class Published:
    """One environment's published files, mapped and verified: its document and, when published, its answers."""

    document: SharedBytes
    answers: SharedBytes | None


class Subscriber:
    """A worker's side: a cheap generation check, then a verified read of what changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path / CONTROL, "rb") as control:
            self._mm = mmap.mmap(control.fileno(), CONTROL_SIZE, access=mmap.ACCESS_READ)
        self._words = memoryview(self._mm).cast("Q")
        if self._words[_MAGIC] != MAGIC:
            raise AreaError(f"{path / CONTROL} is not an edge-proxy control file")
        self.seen = 0
        # client key → (document, answers) locations already handed out
        self._loaded: dict[str, tuple[Location, Location | None]] = {}

    @property
    def published(self) -> int:
        return self._words[_GENERATION]

    def changed(self) -> bool:
        return self._words[_GENERATION] != self.seen

    def read(self) -> tuple[Manifest, dict[str, Published]] | None:
        """(manifest, changed environments' files) when a new generation is readable and verified, else None.

        `seen` advances only when every changed file was mapped and verified; otherwise the next read
        retries, so a reader never settles on a torn or half-written view.
        """
        manifest = read_manifest(self.path)
        if manifest is None or manifest.generation < self._words[_GENERATION]:
            return None  # the counter moved before the rename became visible here: retry
        changed: dict[str, Published] = {}
        for client_key, entry in manifest.environments.items():
            location = entry.location
            if location is None or self._loaded.get(client_key) == (location, entry.answers):
                continue
            document = map_verified(self.path, location)
            answers = map_verified(self.path, entry.answers) if entry.answers is not None else None
            if document is None or (answers is None and entry.answers is not None):
                return None  # lapped by the writer, or torn: the next read retries
            changed[client_key] = Published(document, answers)
        for client_key in changed:
            entry = manifest.environments[client_key]
            assert entry.location is not None
            self._loaded[client_key] = (entry.location, entry.answers)
        for client_key in list(self._loaded):
            if client_key not in manifest.environments:
                del self._loaded[client_key]
        self.seen = manifest.generation
        return manifest, changed

    def poll(self) -> tuple[Manifest, dict[str, bytes]] | None:
        """`read`, with the changed documents as bytes (for readers that want a copy)."""
        found = self.read()
        if found is None:
            return None
        manifest, changed = found
        return manifest, {client_key: published.document.bytes() for client_key, published in changed.items()}

    def close(self) -> None:
        self._words.release()
        self._mm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def map_verified(path: Path, location: Location) -> SharedBytes | None:
    """The file at `location` mapped, or None when it is gone or fails its length or CRC check. The pages read
    to check it are released, so the check does not count in this process's RSS."""
    try:
        mapped = SharedBytes(path / location.file)
    except FileNotFoundError:
        return None
    try:
        if len(mapped) != location.length or mapped.crc32() != location.crc32:
            return None
    finally:
        mapped.release_pages()
    return mapped
