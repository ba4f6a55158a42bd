"""The leader → workers contract: the manifest the publication protocol (`proxy/area/publication.py`) carries.

One typed definition for both sides: the leader writes `ManifestEntry`s (`leader/poller.py`), the
publisher fills in where each document is (`file`, `length`, `crc32`), workers (`store.py`) and health
(`health.py`) read them. The JSON form is what every earlier leader wrote:

    {"generation": 7,
     "environments": {"<client key>": {"server_keys": {"ser.x": null}, "name": "...", "environment_id": 1,
                                       "updated_at": "...",
                                       "last_success": 1.7e9, "last_error": null, "error_kind": null,
                                       "file": "env-<hash>-7.json", "length": 123, "crc32": 456,
                                       "answers_file": "env-<hash>-7.answers", "answers_length": 789,
                                       "answers_crc32": 1011}},
     "meta": {"discovered_at": 1.7e9}}

Between full manifests, each generation's changes are a `Delta` (`journal/<generation>.json`): only the
entries that changed and the environments removed, so a status-only change costs the size of its entry.

Compatibility rule: fields are only ever added, each optional with a default, and readers ignore fields
they do not know, so a restarted leader resumes from whatever the previous version published.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _server_keys(value: object) -> dict[str, float | None]:
    if isinstance(value, Mapping):
        return {str(key): _float(expiry) for key, expiry in value.items()}
    if isinstance(value, list):  # a bare list of keys: none of them expires
        return {str(key): None for key in value}
    return {}


@dataclass(frozen=True, slots=True)
class Location:
    """Where an environment's published document is, and what it must hash to."""

    file: str
    length: int
    crc32: int


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One environment: its keys and the leader's status for it, and where its document is (if any)."""

    server_keys: dict[str, float | None] = field(default_factory=dict)  # server key → expiry (epoch) or None
    name: str | None = None
    environment_id: int | None = None  # the document's `id`: with `name`, how metrics label the environment
    updated_at: str | None = None  # the document's `updated_at`, ISO 8601
    last_success: float | None = None  # wall-clock seconds of the leader's last good answer (200 or 304)
    last_error: str | None = None
    error_kind: str | None = None  # a short category of last_error, safe to show without details
    location: Location | None = None  # None: nothing published for it yet
    answers: Location | None = None  # the document's pre-encoded answers (None: workers encode them)
    # for /proxy/status and health (snapshots): where the document came from and the fetch state
    source: str | None = None  # "upstream", "file" or "snapshot"
    state: str | None = None  # "valid", "interrupted", "initializing"
    state_since: float | None = None
    last_200: float | None = None
    last_304: float | None = None
    snapshot_saved_at: float | None = None
    upstream_etag: str | None = None  # the upstream proxy's ETag for the document: a new leader's If-None-Match

    @property
    def file(self) -> str | None:
        return self.location.file if self.location is not None else None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "server_keys": self.server_keys,
            "name": self.name,
            "environment_id": self.environment_id,
            "updated_at": self.updated_at,
            "last_success": self.last_success,
            "last_error": self.last_error,
            "error_kind": self.error_kind,
        }
        # added for /proxy/status and snapshots: written only when set, so the form above stays as it was
        for name in ("source", "state", "state_since", "last_200", "last_304", "snapshot_saved_at", "upstream_etag"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        if self.location is not None:
            data.update(file=self.location.file, length=self.location.length, crc32=self.location.crc32)
        if self.answers is not None:
            answers = self.answers
            data.update(answers_file=answers.file, answers_length=answers.length, answers_crc32=answers.crc32)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ManifestEntry:
        file = _str(data.get("file"))
        answers = _str(data.get("answers_file"))
        return cls(
            server_keys=_server_keys(data.get("server_keys")),
            name=_str(data.get("name")),
            environment_id=_int_or_none(data.get("environment_id")),
            updated_at=_str(data.get("updated_at")),
            last_success=_float(data.get("last_success")),
            last_error=_str(data.get("last_error")),
            error_kind=_str(data.get("error_kind")),
            location=Location(file, _int(data.get("length")), _int(data.get("crc32"))) if file else None,
            answers=Location(answers, _int(data.get("answers_length")), _int(data.get("answers_crc32")))
            if answers
            else None,
            source=_str(data.get("source")),
            state=_str(data.get("state")),
            state_since=_float(data.get("state_since")),
            last_200=_float(data.get("last_200")),
            last_304=_float(data.get("last_304")),
            snapshot_saved_at=_float(data.get("snapshot_saved_at")),
            upstream_etag=_str(data.get("upstream_etag")),
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    generation: int
    environments: dict[str, ManifestEntry]  # client key → entry
    discovered_at: float | None = None  # with a proxy_key: the last successful proxy-config sync
    # the rest of `meta`: leader_restarts, leader_started_at, snapshots (the store's status), for /proxy/status
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "environments": {key: entry.to_json() for key, entry in self.environments.items()},
            "meta": {**self.extra, "discovered_at": self.discovered_at},
        }

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_json())

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        environments = data.get("environments")
        meta = data.get("meta")
        return cls(
            generation=_int(data.get("generation")),
            environments={
                str(key): ManifestEntry.from_json(entry)
                for key, entry in (environments.items() if isinstance(environments, Mapping) else ())
                if isinstance(entry, Mapping)
            },
            discovered_at=_float(meta.get("discovered_at")) if isinstance(meta, Mapping) else None,
            extra={str(k): v for k, v in meta.items() if k != "discovered_at"} if isinstance(meta, Mapping) else {},
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        loaded = orjson.loads(data)
        if not isinstance(loaded, dict):
            raise ValueError("manifest is not a JSON object")
        return cls.from_json(loaded)


@dataclass(frozen=True, slots=True)
class Delta:
    """What one generation changed: the entries that changed (whole), the environments removed, and `meta`
    when it changed. The JSON form:

        {"generation": 8, "previous": 7, "changed": {"<client key>": {...entry...}}, "removed": ["<client key>"],
         "meta": {"discovered_at": 1.7e9, ...}}            (meta only when it changed)
    """

    generation: int
    changed: dict[str, ManifestEntry]
    removed: list[str]
    meta: tuple[float | None, dict[str, Any]] | None = None  # (discovered_at, extra) when changed

    def to_bytes(self) -> bytes:
        data: dict[str, Any] = {
            "generation": self.generation,
            "previous": self.generation - 1,
            "changed": {key: entry.to_json() for key, entry in self.changed.items()},
            "removed": self.removed,
        }
        if self.meta is not None:
            data["meta"] = {**self.meta[1], "discovered_at": self.meta[0]}
        return orjson.dumps(data)

    @classmethod
    def from_bytes(cls, data: bytes) -> Delta:
        loaded = orjson.loads(data)
        if not isinstance(loaded, dict):
            raise ValueError("journal entry is not a JSON object")
        generation = _int(loaded.get("generation"))
        if _int(loaded.get("previous")) != generation - 1:
            raise ValueError("journal entry does not follow its previous generation")
        changed = loaded.get("changed")
        removed = loaded.get("removed")
        meta = loaded.get("meta")
        return cls(
            generation,
            {
                str(key): ManifestEntry.from_json(entry)
                for key, entry in (changed.items() if isinstance(changed, Mapping) else ())
                if isinstance(entry, Mapping)
            },
            [str(key) for key in removed] if isinstance(removed, list) else [],
            (_float(meta.get("discovered_at")), {str(k): v for k, v in meta.items() if k != "discovered_at"})
            if isinstance(meta, Mapping)
            else None,
        )
