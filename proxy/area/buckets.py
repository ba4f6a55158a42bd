"""Token buckets shared by every worker of a node: a fixed-size table in an mmap'd file of the area.

A rate limit must hold whatever worker a connection lands on, so its buckets cannot live in one worker's
memory. One file per limit (`<area>/buckets-<limit>`), created by the main process before the workers
start (`create`), holds a 64-byte header (magic, number of sets, a random hashing key) and `sets` sets of
`WAYS` slots; a slot is (fingerprint u64, tokens f64, last update f64 in `time.monotonic()` seconds, which
is system-wide on Linux).

* Addressing: keyed BLAKE2b of the bucket's name (a client address, or an environment key, which is never
  stored: only its fingerprint is) gives the fingerprint and the set. The key is random per area, so a
  client cannot compute addresses that collide with someone else's set.
* Bounded memory whatever the number of clients: a name not in its set takes the slot whose bucket is the
  fullest (a full bucket carries no information: a new one starts full), the least recently used among
  equals. Only when a set's every slot is in use by active clients does an eviction forgive a client.
* Concurrency: Python has no atomics, so each set is updated under an `fcntl` byte-range lock on its
  offset (`lockf`; a worker serves requests on one thread, and POSIX locks exclude processes). The lock and
  unlock system calls also order the mmap accesses between processes on every CPU. Measured cost in
  `benchmarks/test_micro.py::test_rate_limit_take`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import secrets
import struct
import time
from pathlib import Path

from proxy.area.names import buckets_file, temporary

MAGIC = 0x45445042_4B545331  # "EDPBKTS1"
HEADER = struct.Struct("<QQ16s")  # magic, sets, hashing key
HEADER_SIZE = 64
WAYS = 4
SLOT = struct.Struct("<Qdd")  # fingerprint (0: empty), tokens, last update
SET = struct.Struct("<" + "Qdd" * WAYS)
INDEX_MAX = 65_536  # names whose fingerprint and set a worker remembers (cleared when full)


def table_path(area: Path, limit: str) -> Path:
    return area / buckets_file(limit)


def create(path: Path, entries: int) -> None:
    """A new, empty table of about `entries` buckets (rounded up to whole sets), replacing any old one."""
    sets = max(1, -(-entries // WAYS))
    tmp = temporary(path)
    with open(tmp, "wb") as out:
        out.write(HEADER.pack(MAGIC, sets, secrets.token_bytes(16)).ljust(HEADER_SIZE, b"\0"))
        out.truncate(HEADER_SIZE + sets * SET.size)  # sparse zeros: every slot empty
    os.rename(tmp, path)


class BucketTable:
    """One limit's buckets. `path` None: private to this process (no area: in-process tests, tools)."""

    def __init__(self, path: Path | None, entries: int = 1024) -> None:
        self.fd = -1
        if path is None:
            sets = max(1, -(-entries // WAYS))
            self.map = mmap.mmap(-1, HEADER_SIZE + sets * SET.size)
            HEADER.pack_into(self.map, 0, MAGIC, sets, secrets.token_bytes(16))
        else:
            self.fd = os.open(path, os.O_RDWR)
            self.map = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        magic, self.sets, self.secret = HEADER.unpack_from(self.map, 0)
        if magic != MAGIC or len(self.map) < HEADER_SIZE + self.sets * SET.size:
            self.close()
            raise ValueError(f"{path} is not a bucket table")
        self._index: dict[str | bytes, tuple[int, int]] = {}

    def _locate(self, name: str | bytes) -> tuple[int, int]:
        data = name.encode() if isinstance(name, str) else name
        digest = hashlib.blake2b(data, digest_size=16, key=self.secret).digest()
        fingerprint = int.from_bytes(digest[:8], "little") | 1  # never 0, which marks an empty slot
        offset = HEADER_SIZE + int.from_bytes(digest[8:], "little") % self.sets * SET.size
        if len(self._index) >= INDEX_MAX:
            self._index.clear()
        found = self._index[name] = (fingerprint, offset)
        return found

    def take(self, name: str | bytes, rate: float, burst: float) -> float:
        """Take a token from `name`'s bucket (`rate` tokens a second, at most `burst`): 0.0 when taken,
        otherwise the seconds until one will be there."""
        found = self._index.get(name)
        fingerprint, offset = found if found is not None else self._locate(name)
        fd = self.fd
        if fd >= 0:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, offset)
        try:
            values = SET.unpack_from(self.map, offset)
            now = time.monotonic()  # read under the lock: stamps in the table are never ahead of it
            fingerprints = values[0::3]
            if fingerprint in fingerprints:
                way = fingerprints.index(fingerprint)
                tokens = min(burst, values[way * 3 + 1] + max(0.0, now - values[way * 3 + 2]) * rate)
            else:
                way, tokens = self._victim(values, now, rate, burst), burst
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / rate
            SLOT.pack_into(self.map, offset + way * SLOT.size, fingerprint, tokens, now)
        finally:
            if fd >= 0:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)
        return wait

    @staticmethod
    def _victim(values: tuple[float, ...], now: float, rate: float, burst: float) -> int:
        """The slot a new name takes: an empty one, else the fullest bucket (a full one carries no
        information), the least recently used among equals."""
        best, best_level, best_stamp = 0, -1.0, 0.0
        for way in range(WAYS):
            fingerprint, tokens, stamp = values[way * 3 : way * 3 + 3]
            level = burst if fingerprint == 0 else min(burst, tokens + (now - stamp) * rate)
            if level > best_level or (level == best_level and stamp < best_stamp):
                best, best_level, best_stamp = way, level, stamp
        return best

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
