"""The answers file: one environment's pre-encoded environment-level answers, written once by the leader.

Everything a worker would otherwise build for every environment it serves, whether or not it ever sees
a request for it: the flag list each key kind sees (plain and gzip), each single flag (`?feature=`), the
document's gzip copy and its headers. Published beside the document (`env-<hash>-<gen>.answers`, see
`proxy/area/names.py`), mapped by every worker (`proxy/area/shared_bytes.py`): one copy for the node.

Layout (little-endian), built so that a worker reads only what it serves:

    header   magic "EPANSWR1", format u32, flags u32 (bit 0: environment id present), environment id i64,
             then SECTIONS × (offset u32, length u32); an absent section has length ABSENT
    payload  the sections' bytes, client flags first (the most served), the document's gzip copy last

A single flag is a slice of its kind's flag list (orjson writes a list as its items joined by commas),
so single flags cost an index entry, not their bytes again. The index of single flags is a JSON section
(`{"client": {name: [offset, length]}, "server": {...}}`, with `[..., gzip offset, gzip length]` for the
rare flag large enough to compress), read only by `?feature=` and analytics.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import orjson

from proxy.area.bodies import GZIP_MIN_BYTES, compress

MAGIC = b"EPANSWR1"
FORMAT = 1
ABSENT = 0xFFFFFFFF


class Section(IntEnum):
    UPDATED_AT = 0  # X-Flagsmith-Document-Updated-At: epoch seconds
    LAST_MODIFIED = 1  # Last-Modified: IMF-fixdate
    ETAG = 2  # a strong ETag of the document, when the leader has one
    CLIENT_GZIP = 3
    CLIENT_FLAGS = 4
    SERVER_GZIP = 5
    SERVER_FLAGS = 6
    SINGLES = 7  # JSON index of single flags per kind
    DOCUMENT_GZIP = 8


FLAGS = (Section.CLIENT_FLAGS, Section.SERVER_FLAGS)  # by KeyKind
GZIPPED = (Section.CLIENT_GZIP, Section.SERVER_GZIP)
_HEAD = struct.Struct("<8sIIq")
_SECTION = struct.Struct("<II")
HEADER_SIZE = _HEAD.size + _SECTION.size * len(Section)
_HAS_ID = 1


class AnswersError(ValueError):
    """Not an answers file this version reads (the worker builds the answers from the document instead)."""


@dataclass(frozen=True, slots=True)
class KindAnswers:
    """What one key kind sees without an identity."""

    flags: Sequence[bytes]  # each visible flag, encoded; the list is these joined
    names: Sequence[str]  # the flags' feature names, in the same order


def encode(
    environment_id: int | None,
    headers: tuple[bytes | None, bytes | None, bytes | None],
    kinds: tuple[KindAnswers, KindAnswers],
    document_gzip: bytes | None,
) -> bytes:
    """The answers file. `headers`: (updated-at, last-modified, etag); `kinds`: (client, server)."""
    singles: dict[str, dict[str, list[int]]] = {}
    payload = bytearray()
    offsets: dict[Section, tuple[int, int]] = {}

    def put(section: Section, data: bytes | None) -> None:
        if data is not None:
            offsets[section] = (HEADER_SIZE + len(payload), len(data))
            payload.extend(data)

    for section, value in zip((Section.UPDATED_AT, Section.LAST_MODIFIED, Section.ETAG), headers, strict=True):
        put(section, value)
    large: list[tuple[list[int], bytes]] = []  # single flags worth compressing: their index entry, the gzip
    for label, kind, flags_section, gzip_section in zip(("client", "server"), kinds, FLAGS, GZIPPED, strict=True):
        listed = b"[" + b",".join(kind.flags) + b"]"
        put(gzip_section, compress(listed) if len(listed) >= GZIP_MIN_BYTES else None)
        start = HEADER_SIZE + len(payload) + 1  # past the "["
        index: dict[str, list[int]] = {}
        for name, flag in zip(kind.names, kind.flags, strict=True):
            index[name] = [start, len(flag)]
            if len(flag) >= GZIP_MIN_BYTES:
                large.append((index[name], compress(flag)))
            start += len(flag) + 1  # the comma
        put(flags_section, listed)
        singles[label] = index
    for entry, gzipped in large:
        entry.extend((HEADER_SIZE + len(payload), len(gzipped)))
        payload.extend(gzipped)
    put(Section.SINGLES, orjson.dumps(singles))
    put(Section.DOCUMENT_GZIP, document_gzip)
    head = _HEAD.pack(MAGIC, FORMAT, _HAS_ID if environment_id is not None else 0, environment_id or 0)
    table = b"".join(_SECTION.pack(*offsets.get(section, (0, ABSENT))) for section in Section)
    return head + table + bytes(payload)


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed part of an answers file: where each section is. Kept by a worker per environment (about
    100 bytes); the sections themselves stay in the shared mapping."""

    raw: bytes
    environment_id: int | None

    @classmethod
    def parse(cls, raw: bytes) -> Header:
        if len(raw) < HEADER_SIZE:
            raise AnswersError(f"answers file shorter than its header ({len(raw)} bytes)")
        magic, version, flags, environment_id = _HEAD.unpack_from(raw)
        if magic != MAGIC or version != FORMAT:
            raise AnswersError(f"not an answers file of format {FORMAT}")
        return cls(bytes(raw[:HEADER_SIZE]), environment_id if flags & _HAS_ID else None)

    def section(self, section: Section) -> tuple[int, int] | None:
        """(offset, length) of `section` in the file, or None when it is absent."""
        offset, length = _SECTION.unpack_from(self.raw, _HEAD.size + _SECTION.size * section)
        return None if length == ABSENT else (offset, length)


Singles = dict[str, tuple[int, ...]]  # feature name → (offset, length[, gzip offset, gzip length])


def parse_singles(data: bytes) -> tuple[Singles, Singles]:
    """The single-flag index: (client, server)."""
    loaded = orjson.loads(data)
    client, server = ({name: tuple(at) for name, at in loaded[label].items()} for label in ("client", "server"))
    return client, server
