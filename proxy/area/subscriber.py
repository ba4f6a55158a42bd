"""The workers' side of the publication protocol (`proxy/area/publication.py` describes it): a cheap
generation check, then a verified read of what changed, proportional to what changed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from proxy.area.control import Control
from proxy.area.manifest import Delta, Location, Manifest, ManifestEntry
from proxy.area.names import JOURNAL, MANIFEST, journal_file
from proxy.area.shared_bytes import SharedBytes

Meta = tuple[float | None, dict[str, Any]]  # (discovered_at, the rest of `meta`)


def read_manifest(path: Path) -> Manifest | None:
    try:
        return Manifest.from_bytes((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None


def read_journal(path: Path, generation: int) -> Delta | None:
    """Generation `generation`'s journal entry, or None when it is not there (yet, or any more) or is not it."""
    try:
        delta = Delta.from_bytes((path / JOURNAL / journal_file(generation)).read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return delta if delta.generation == generation else None


def read_published(path: Path, upto: int) -> Manifest | None:
    """What was published as of generation `upto`, or later: the manifest and the journal entries after it
    (as far as they are there). None when nothing was published."""
    manifest = read_manifest(path)
    if manifest is None:
        return None
    generation, entries, meta = (
        manifest.generation,
        dict(manifest.environments),
        (manifest.discovered_at, manifest.extra),
    )
    while generation < upto and (delta := read_journal(path, generation + 1)) is not None:
        generation = delta.generation
        for key in delta.removed:
            entries.pop(key, None)
        entries.update(delta.changed)
        meta = delta.meta or meta
    return Manifest(generation, entries, meta[0], meta[1])


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


@dataclass(frozen=True, slots=True)
class Published:
    """One environment's published files, mapped and verified: its document and, when published, its answers."""

    document: SharedBytes
    answers: SharedBytes | None


@dataclass(frozen=True, slots=True)
class Update:
    """What a reader learned from one read: a new generation's entries and the files they point to."""

    generation: int
    full: bool  # True: `entries` is every environment (the reader was behind the journal, or new)
    entries: dict[str, ManifestEntry]  # the changed entries (all of them when full)
    removed: frozenset[str]
    meta: Meta | None  # (discovered_at, the rest) when it changed (always when full)
    published: dict[str, Published]  # the environments whose files changed, mapped and verified


class Subscriber:
    """A worker's side: a cheap generation check, then a verified read of what changed. One reader at a time
    (a worker reads in one thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._control = Control(path)
        self.seen = 0
        self._entries: dict[str, ManifestEntry] | None = None  # as of `seen`; None before the first read
        self._meta: Meta = (None, {})
        # client key → (document, answers) locations already handed out
        self._loaded: dict[str, tuple[Location, Location | None]] = {}

    @property
    def published(self) -> int:
        return self._control.generation

    def changed(self) -> bool:
        return self._control.generation != self.seen

    def read(self) -> Update | None:
        """The next generation's update, when it is readable and verified; else None (the next read retries,
        so a reader never settles on a torn or half-written view)."""
        upto = self._control.generation
        update = self._from_journal(upto) if self._entries is not None else None
        if update is None:
            update = self._from_manifest(upto)
        if update is None:
            return None
        entries, removed, generation, full, meta = update
        published: dict[str, Published] = {}
        for client_key, entry in entries.items():
            location = entry.location
            if location is None or self._loaded.get(client_key) == (location, entry.answers):
                continue
            document = map_verified(self.path, location)
            answers = map_verified(self.path, entry.answers) if entry.answers is not None else None
            if document is None or (answers is None and entry.answers is not None):
                return None  # lapped by the writer, or torn: the next read retries
            published[client_key] = Published(document, answers)
        self._commit(entries, removed, full, meta)
        for client_key in published:
            entry = entries[client_key]
            assert entry.location is not None
            self._loaded[client_key] = (entry.location, entry.answers)
        self.seen = generation
        return Update(generation, full, entries, frozenset(removed), meta, published)

    def _from_journal(self, upto: int) -> tuple[dict[str, ManifestEntry], set[str], int, bool, Meta | None] | None:
        """The journal entries after `seen` merged, or None when one is missing (behind the journal)."""
        entries: dict[str, ManifestEntry] = {}
        removed: set[str] = set()
        meta: Meta | None = None
        generation = self.seen
        while generation < upto:
            delta = read_journal(self.path, generation + 1)
            if delta is None:
                return None
            generation = delta.generation
            for key in delta.removed:
                entries.pop(key, None)
                removed.add(key)
            for key, entry in delta.changed.items():
                entries[key] = entry
                removed.discard(key)
            meta = delta.meta or meta
        return entries, removed, generation, False, meta

    def _from_manifest(self, upto: int) -> tuple[dict[str, ManifestEntry], set[str], int, bool, Meta | None] | None:
        published = read_published(self.path, upto)
        if published is None or published.generation < upto:
            return None  # the counter moved before the renames became visible here: retry
        removed = set(self._entries or ()) - set(published.environments)
        return published.environments, removed, published.generation, True, (published.discovered_at, published.extra)

    def _commit(self, entries: dict[str, ManifestEntry], removed: set[str], full: bool, meta: Meta | None) -> None:
        if full or self._entries is None:
            self._entries = dict(entries)
        else:
            for key in removed:
                self._entries.pop(key, None)
            self._entries.update(entries)
        for key in removed:
            self._loaded.pop(key, None)
        if meta is not None:
            self._meta = meta

    def poll(self) -> tuple[Manifest, dict[str, bytes]] | None:
        """`read`, as the whole manifest and the changed documents' bytes (for readers that want a copy)."""
        update = self.read()
        if update is None:
            return None
        manifest = Manifest(update.generation, dict(self._entries or {}), self._meta[0], self._meta[1])
        return manifest, {client_key: files.document.bytes() for client_key, files in update.published.items()}

    def close(self) -> None:
        self._control.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
