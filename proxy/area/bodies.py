"""Pre-encoded bodies and the key kinds they are encoded for: built once, sent as they are.

Shared by whoever encodes (environment states) and whoever sends (routes, caches): a body is its plain
bytes and, when worth it, the same bytes gzip-compressed, so the request path never compresses.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, replace
from enum import IntEnum

# Bodies smaller than this are sent uncompressed, as the Python proxy does.
GZIP_MIN_BYTES = 1000


class KeyKind(IntEnum):
    CLIENT = 0
    SERVER = 1


@dataclass(frozen=True, slots=True)
class Body:
    plain: bytes
    gzip: bytes | None  # None when the body is too small to be worth compressing

    @classmethod
    def of(cls, data: bytes) -> Body:
        return cls(data, compress(data) if len(data) >= GZIP_MIN_BYTES else None)

    def compressed(self) -> Body:
        """The same body with its gzip copy (a subclass keeps its other fields)."""
        return replace(self, gzip=compress(self.plain))

    def size(self) -> int:
        """Bytes held (a subclass holding more says so: the response cache counts this)."""
        return len(self.plain) + len(self.gzip or b"")


def compress(data: bytes) -> bytes:
    # mtime=0 keeps the bytes deterministic across workers and restarts.
    return gzip.compress(data, compresslevel=6, mtime=0)
