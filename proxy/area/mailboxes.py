"""Counts a worker hands to the leader through the shared-memory area: one small file per flush.

Used for SDK analytics and for usage reporting. A worker adds up counts in memory (a dict increment on the
request path) and, about once a second, writes them to `<area>/<folder>/<pid>-<n>.json` (atomically, by
rename); the leader reads those files, and removes them only once what they hold is safe: forwarded
upstream, or written to the leader's own pending file in the same folder (`Inbox`).

Sums are clamped at MAX_SUM so no total ever leaves 64 bits (orjson encodes at most unsigned 64-bit
integers), and a buffer holds at most MAX_NAMES names: a hand-over can never fail on what clients sent.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from proxy.area.names import HANDED_OVER_GLOB, PENDING, handed_over, temporary

log = logging.getLogger("proxy.handover")

MAX_SUM = 2**53  # exact in every JSON reader, far above any real count
MAX_NAMES = 100_000  # per buffer, across environments

Counts = defaultdict[str, Counter[str]]


def add(total: Counts, client_key: str, counts: Mapping[str, int]) -> int:
    """Add `counts` to `total`, clamped, within MAX_NAMES; returns how many counts were dropped."""
    into = total[client_key]
    dropped = 0
    for name, count in counts.items():
        if name not in into and _names(total) >= MAX_NAMES:
            dropped += count
            continue
        into[name] = min(MAX_SUM, into[name] + count)
    return dropped


def _names(total: Counts) -> int:
    return sum(len(c) for c in total.values())


class CountsBuffer:
    """A worker's counts since its last hand-over: client key → name → count."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.counts: Counts = defaultdict(Counter)
        self.dropped = 0  # counts refused because the buffer was full (metrics)
        self._sequence = 0

    def record(self, client_key: str, counts: Mapping[str, int]) -> None:
        self.dropped += add(self.counts, client_key, counts)

    def increment(self, client_key: str, name: str) -> None:
        counts = self.counts[client_key]
        counts[name] = min(MAX_SUM, counts[name] + 1)

    def hand_over(self, area: Path) -> None:
        """Write the counts for the leader and start afresh. On failure the counts are dropped (logged):
        keeping them would retry the same failure every second."""
        if not self.counts:
            return
        counts, self.counts = self.counts, defaultdict(Counter)
        try:
            folder = area / self.folder
            folder.mkdir(exist_ok=True)
            self._sequence += 1
            path = folder / handed_over(os.getpid(), self._sequence)
            tmp = temporary(path)
            tmp.write_bytes(orjson.dumps(counts))
            os.rename(tmp, path)
        except (OSError, TypeError) as exc:
            log.error("could not hand %s counts over to the leader, dropped: %s", self.folder, exc)


class Inbox:
    """The leader's side of one hand-over folder.

    `take()` sums the workers' files and the pending remainder; `settle(remainder)` writes what could not be
    forwarded as the new pending file (atomically) and only then removes the files that were read. A
    leader killed in between loses nothing (it may count a remainder twice, never lose it).
    """

    def __init__(self, area: Path, folder: str) -> None:
        self.directory = area / folder
        self._read: list[Path] = []

    def take(self) -> Counts:
        total: Counts = defaultdict(Counter)
        self._read = []
        if not self.directory.is_dir():
            return total
        paths = sorted(self.directory.glob(HANDED_OVER_GLOB))
        pending = self.directory / PENDING
        if pending.exists():
            paths.append(pending)
        for path in paths:
            try:
                data: Any = orjson.loads(path.read_bytes())
                if not isinstance(data, dict):
                    raise ValueError("not an object")
                for client_key, counts in data.items():
                    add(total, client_key, {n: c for n, c in counts.items() if isinstance(c, int) and c > 0})
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("dropping an unreadable hand-over %s/%s: %s", self.directory.name, path.name, exc)
            self._read.append(path)
        return total

    def settle(self, remainder: Mapping[str, Mapping[str, int]]) -> None:
        remainder = {key: dict(counts) for key, counts in remainder.items() if counts}
        pending = self.directory / PENDING
        if remainder:
            self.directory.mkdir(exist_ok=True)
            tmp = temporary(pending)
            tmp.write_bytes(orjson.dumps(remainder))
            os.rename(tmp, pending)
        for path in self._read:
            if remainder and path == pending:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
        self._read = []

    def files(self) -> int:
        return len(list(self.directory.glob("*.json"))) if self.directory.is_dir() else 0
