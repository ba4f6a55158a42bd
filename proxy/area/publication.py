"""Publication of environment documents from the leader to the workers through the shared-memory area.

Write-then-rename, a journal of what each generation changed, and a generation counter (the control words,
`proxy/area/control.py`) for the cheap "anything new?" check. Every name is in `proxy/area/names.py`.

* Each published document is an immutable file `env-<key hash>-<generation>.json`, its answers
  (`proxy/area/answers.py`) beside it as `env-<key hash>-<generation>.answers`. Changing one of 10,000
  environments writes its two files.
* Each generation's changes are a journal entry `journal/<generation>.json` (`Delta`): the entries that
  changed and the environments removed. A status-only change (a 304, a timestamp, an error) is that one
  environment's entry.
* `manifest.json` lists every environment (`Manifest`: keys, where its files are, their lengths and CRC32s,
  the leader's status). It is rewritten at a publisher's first publication and then every FULL_EVERY
  generations, or sooner when the journal since the last one outweighs it, so that a reader that is behind
  reads at most about twice its size. Journal entries after the previous manifest are kept: a reader that
  has just read the previous manifest finds every entry after it.
* Only then is the generation stored into the control words.

A reader that is current reads only the journal entries after its generation: its work is proportional to
what changed. A reader behind the journal (a new worker, one that fell behind) reads the manifest, then the
entries after it. Everything is verified as it is read: the manifest and each journal entry carry their
generation (a reader that sees the counter before a rename became visible to it retries on its next read),
each journal entry names its predecessor, every mapped file is checked against its length and CRC32, and
a reader's generation (`seen`) advances only when all of it was.

Why not a seqlock over one big mmap: Python exposes no memory fences, so on weakly ordered CPUs (arm64)
a seqlock reader can observe the counter before the data. Here every data access is a syscall (rename,
open, read, mmap), which the kernel orders; what the counter's plain store could still get ahead of is
caught by the generations inside the files, as above.
"""

from __future__ import annotations

import contextlib
import errno
import os
import zlib
from collections.abc import Collection, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

from proxy.area.control import Area as Area
from proxy.area.control import AreaError as AreaError
from proxy.area.control import Control, full_message
from proxy.area.manifest import Delta, Location, Manifest, ManifestEntry
from proxy.area.names import JOURNAL, MANIFEST, PUBLISHED_GLOB, answers_file, document_file, journal_file, temporary
from proxy.area.names import key_hash as key_hash
from proxy.area.subscriber import Meta, read_published, read_verified
from proxy.area.subscriber import Published as Published  # callers have always found the reader's side here
from proxy.area.subscriber import Subscriber as Subscriber

# Generations between full manifests at the latest: it bounds the journal's files (twice this many); its size
# calls for a full manifest long before (10,000 environments: about every 100 status-only generations).
FULL_EVERY = 512
JOURNAL_MIN_BYTES = 64 * 1024  # a journal this small never calls for a full manifest by its size


class Publisher:
    """The leader's side. Not thread-safe: one leader, one writer."""

    def __init__(self, path: Path, max_bytes: int | None = None, full_every: int = FULL_EVERY) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.full_every = full_every
        self._control = Control(path, writable=True)
        self.generation = self._control.generation
        self._entries: dict[str, ManifestEntry] = {}  # what is published, with where its files are
        self._meta: Meta | None = None
        self._bases: tuple[int, int] | None = None  # the last two manifests this publisher wrote (older, newer)
        self._journal_bytes = 0  # journal written since the newer manifest
        self._manifest_bytes = 0
        self._sizes: dict[str, int] = {}  # published files kept, documents and answers → bytes
        self._superseded: list[str] = []  # files replaced by the last publication: removed by the next
        (path / JOURNAL).mkdir(exist_ok=True)

    def resume(self) -> Manifest | None:
        """The last published state (a restarted leader continues from it): the manifest and the journal
        after it, or None."""
        manifest = read_published(self.path, self._control.generation)
        if manifest is not None:
            self.generation = max(self.generation, manifest.generation)
            self._entries = dict(manifest.environments)
            self._meta = (manifest.discovered_at, manifest.extra)
        current = {location.file for entry in self._entries.values() for location in _files(entry)}
        # A killed leader may have left older files and half-written temporaries: the next publication
        # removes the files (readers may still be on them now), the temporaries go now.
        for path in self.path.glob(PUBLISHED_GLOB):
            with contextlib.suppress(OSError):
                self._sizes[path.name] = path.stat().st_size
                if path.name not in current:
                    self._superseded.append(path.name)
        for tmp in [*self.path.glob(".*.tmp"), *(self.path / JOURNAL).glob(".*.tmp")]:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return manifest

    def beat(self) -> None:
        """The leader is alive and its loop turns: called from the event loop every HEARTBEAT_EVERY."""
        self._control.beat()

    def read_document(self, entry: ManifestEntry) -> bytes | None:
        return read_verified(self.path, entry.location)

    def has_answers(self, client_key: str) -> bool:
        """Are the answers of `client_key`'s published document published too (not always, resuming the
        main process's preload or an older leader's publication)?"""
        entry = self._entries.get(client_key)
        return entry is not None and entry.answers is not None

    def publish(
        self,
        documents: Mapping[str, bytes],
        environments: Mapping[str, ManifestEntry],
        discovered_at: float | None = None,
        extra: Mapping[str, Any] | None = None,
        answers: Mapping[str, bytes] | None = None,
    ) -> int:
        """`publish_changes` given every environment: an environment left out is no longer published, and
        only the entries that differ from what is published go into the journal."""
        changed = {
            key: entry
            for key, entry in environments.items()
            if key in documents or _status(entry) != _status(self._entries.get(key))
        }
        removed = [key for key in self._entries if key not in environments]
        return self.publish_changes(documents, changed, removed, discovered_at, extra, answers)

    def publish_changes(
        self,
        documents: Mapping[str, bytes],
        changed: Mapping[str, ManifestEntry],
        removed: Collection[str] = (),
        discovered_at: float | None = None,
        extra: Mapping[str, Any] | None = None,
        answers: Mapping[str, bytes] | None = None,
    ) -> int:
        """One generation: the changed `documents` (client key → bytes) and their `answers` (client key → the
        answers file; a document without them gets none), the `changed` entries (the leader's status; the
        publisher sets where each environment's files are) and the `removed` environments.
        On failure nothing already published is touched."""
        generation = self.generation + 1
        answers = answers or {}
        self._check_room(sum(len(data) + len(answers.get(key, b"")) for key, data in documents.items()))
        meta: Meta = (discovered_at, dict(extra or {}))
        written: list[Path] = []
        try:
            entries: dict[str, ManifestEntry] = {}
            for client_key in {**changed, **documents}:
                entries[client_key] = self._located(client_key, changed, documents, answers, generation, written)
            gone = [key for key in removed if key in self._entries and key not in entries]
            delta = Delta(generation, entries, gone, meta if meta != self._meta else None).to_bytes()
            journal = self.path / JOURNAL / journal_file(generation)
            _write_atomic(journal, delta)
            written.append(journal)
            full = self._bases is None or generation - self._bases[1] >= self.full_every
            full = full or self._journal_bytes + len(delta) > max(JOURNAL_MIN_BYTES, self._manifest_bytes)
            manifest = b""
            if full:
                everything = {key: entry for key, entry in self._entries.items() if key not in gone} | entries
                manifest = Manifest(generation, everything, discovered_at, meta[1]).to_bytes()
                _write_atomic(self.path / MANIFEST, manifest)
        except OSError as exc:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            if exc.errno == errno.ENOSPC:
                raise AreaError(full_message(self.path)) from None
            raise AreaError(f"cannot publish to {self.path}: {exc}") from None
        self._control.generation = self.generation = generation
        self._meta = meta
        superseded = [
            location.file
            for key in [*entries, *gone]
            if key in self._entries
            for location in _files(self._entries[key])
            if key in gone or key in documents
        ]
        for key in gone:
            del self._entries[key]
        self._entries.update(entries)
        self._tidy(superseded, written, full, len(delta), len(manifest))
        return generation

    def _located(
        self,
        client_key: str,
        changed: Mapping[str, ManifestEntry],
        documents: Mapping[str, bytes],
        answers: Mapping[str, bytes],
        generation: int,
        written: list[Path],
    ) -> ManifestEntry:
        """The entry as published: the leader's status, and where the environment's files are now."""
        previous = self._entries.get(client_key)
        status = changed.get(client_key) or previous or ManifestEntry()
        location, answered = (previous.location, previous.answers) if previous is not None else (None, None)
        if client_key in documents:
            location = self._write(document_file(client_key, generation), documents[client_key], written)
            answered = None
            if client_key in answers:
                answered = self._write(answers_file(client_key, generation), answers[client_key], written)
        return replace(status, location=location, answers=answered)

    def _write(self, name: str, data: bytes, written: list[Path]) -> Location:
        _write_atomic(self.path / name, data)
        written.append(self.path / name)
        return Location(name, len(data), zlib.crc32(data))

    def _tidy(self, superseded: list[str], written: list[Path], full: bool, delta: int, manifest: int) -> None:
        """After a publication: files superseded by the one before go (a reader may have read the old entries
        a moment ago, so the newest superseded stay one more round), and journal entries no reader needs."""
        for name in self._superseded:
            with contextlib.suppress(OSError):
                (self.path / name).unlink()
            self._sizes.pop(name, None)
        self._superseded = superseded
        for path in written:
            if path.parent == self.path:
                self._sizes[path.name] = path.stat().st_size
        if not full:
            self._journal_bytes += delta
            return
        # a publisher's first manifest: what came before it was another leader's, readers of it go to this one
        older = self._bases[1] if self._bases is not None else self.generation - 1
        self._bases = (older, self.generation)
        self._journal_bytes, self._manifest_bytes = 0, manifest
        # readers of the older manifest need the entries after it; none needs those up to it
        for entry in (self.path / JOURNAL).iterdir():
            number = entry.name.removesuffix(".json")
            if number.isdigit() and int(number) <= older:
                with contextlib.suppress(OSError):
                    entry.unlink()

    def _check_room(self, needed: int) -> None:
        """Refuse before writing anything: a half-done publication must not push out what is published."""
        stats = os.statvfs(self.path)
        free = stats.f_bavail * stats.f_frsize
        if needed > free:
            raise AreaError(full_message(self.path, free))
        if self.max_bytes is not None:
            used = sum(self._sizes.values())
            if used + needed > self.max_bytes:
                raise AreaError(
                    f"shared-memory area {self.path} would exceed shared_memory_max_bytes "
                    f"({used + needed} > {self.max_bytes} bytes): raise shared_memory_max_bytes and the size of "
                    "its filesystem (docker run --shm-size, or a Kubernetes emptyDir with medium: Memory)"
                )

    def close(self) -> None:
        self._control.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _status(entry: ManifestEntry | None) -> ManifestEntry | None:
    return replace(entry, location=None, answers=None) if entry is not None else None


def _files(entry: ManifestEntry) -> list[Location]:
    return [location for location in (entry.location, entry.answers) if location is not None]


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
