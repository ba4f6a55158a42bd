"""One environment as the leader holds it: its keys, the last good document with its answers, its status; and
the one way a document becomes its (`Environment.adopt`), whether fetched, restored from a snapshot or taken
over from a previous leader's publication.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from proxy.area.manifest import ManifestEntry
from proxy.evaluation.environment import answers_for, parse_updated_at
from proxy.leader.sources import Validator


class Unservable(Exception):
    """A document no worker could serve (the leader cannot evaluate and encode it); the message says why."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A document ready to be adopted: its bytes as published, parsed, and its answers encoded (None: already
    published with them, by a previous leader)."""

    data: bytes
    document: Mapping[str, Any]
    answers: bytes | None


def prepare(data: bytes, document: Mapping[str, Any] | None = None) -> Candidate:
    """Parse (unless given parsed) and encode a document's answers (CPU: call it in a thread); Unservable if it
    cannot be served."""
    try:
        document = orjson.loads(data) if document is None else document
        if not isinstance(document, dict):
            raise TypeError(f"a JSON {type(document).__name__}, not an object")
        return Candidate(data, document, answers_for(data))
    except Exception as exc:
        raise Unservable(f"{type(exc).__name__}: {exc}") from None


async def prepare_off_loop(data: bytes, document: Mapping[str, Any] | None = None) -> Candidate:
    return await asyncio.to_thread(prepare, data, document)


@dataclass(slots=True)
class Environment:
    client_key: str
    server_keys: dict[str, float | None]  # server key → expiry (epoch seconds) or None
    static: bool = True  # from environment_key_pairs: never removed by discovery
    document: bytes | None = None
    answers: bytes | None = None  # the document's answers file until it is published (then the area's)
    updated_at: datetime | None = None
    name: str | None = None
    environment_id: int | None = None  # the document's `id`: with `name`, how metrics label the environment
    last_success: float | None = None  # wall-clock seconds of the last good answer (200 or 304)
    last_error: str | None = None
    error_kind: str | None = None  # a short category of last_error, safe to show without details
    failures: int = 0
    fetched: int = 0  # good answers since this leader started (the first spreads the schedule)
    next_due: float = 0.0
    dirty: bool = False  # a document not yet published
    # for /proxy/status and health: where the document came from, and the state in LaunchDarkly's terms
    source: str | None = None  # "upstream", "file" or "snapshot"
    state: str = "initializing"  # "valid" (last fetch good), "interrupted" (failing, serving), "initializing"
    state_since: float = field(default_factory=time.time)
    last_200: float | None = None
    last_304: float | None = None
    snapshot_saved_at: float | None = None  # when the snapshot served (source "snapshot") was written
    unsaved: bool = False  # a new document not yet written to the snapshot store
    # for conditional fetches: set only from the source's own answers, never from a snapshot (a restored
    # document is fetched in full, so a stored date can never make upstream confirm a stored document)
    validator: Validator | None = None

    @property
    def server_key(self) -> str:
        """The key used to fetch the document: the first one (discovered keys are sorted)."""
        return next(iter(self.server_keys))

    def adopt(self, candidate: Candidate, published: bool = False) -> None:
        """Make `candidate` this environment's document. `published`: it already is (taken over from a previous
        leader's publication); otherwise the next publication carries it."""
        document = candidate.document
        self.document, self.answers = candidate.data, candidate.answers
        self.updated_at = parse_updated_at(document.get("updated_at"))
        name, found = document.get("name"), document.get("id")
        self.name = name if isinstance(name, str) else None
        self.environment_id = found if isinstance(found, int) and not isinstance(found, bool) else None
        self.dirty = self.dirty or not published

    def resume_from(self, entry: ManifestEntry) -> None:
        """What a previous leader published for this environment (resuming from its publication)."""
        self.last_success, self.last_error, self.error_kind = entry.last_success, entry.last_error, entry.error_kind
        for name in ("source", "state", "state_since", "last_200", "last_304", "snapshot_saved_at"):
            if getattr(entry, name) is not None:
                setattr(self, name, getattr(entry, name))

    def manifest_entry(self) -> ManifestEntry:
        """Its manifest entry; the publisher adds where the document is."""
        return ManifestEntry(
            server_keys=self.server_keys,
            name=self.name,
            environment_id=self.environment_id,
            updated_at=self.updated_at.isoformat() if self.updated_at else None,
            last_success=self.last_success,
            last_error=self.last_error,
            error_kind=self.error_kind,
            source=self.source,
            state=self.state,
            state_since=self.state_since,
            last_200=self.last_200,
            last_304=self.last_304,
            snapshot_saved_at=self.snapshot_saved_at,
            upstream_etag=self.validator.etag if self.validator is not None else None,
        )

    def enter(self, state: str) -> None:
        if state != self.state:
            self.state, self.state_since = state, time.time()
