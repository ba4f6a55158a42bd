"""Counts a worker hands to the leader through the shared-memory area: one small file per flush.

Used for SDK analytics and for usage reporting. A worker adds up counts in memory (a dict increment on the
request path) and, about once a second, writes them to `<area>/<folder>/<pid>-<n>.json` (atomically, by
rename); the leader sums and removes those files when it flushes upstream.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("proxy.handover")


class CountsBuffer:
    """A worker's counts since its last hand-over: client key → name → count."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._sequence = 0

    def record(self, client_key: str, counts: dict[str, int]) -> None:
        self.counts[client_key].update(counts)

    def hand_over(self, area: Path) -> None:
        """Write the counts for the leader and start afresh."""
        if not self.counts:
            return
        folder = area / self.folder
        folder.mkdir(exist_ok=True)
        self._sequence += 1
        name = f"{os.getpid()}-{self._sequence}.json"
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(orjson.dumps(self.counts))
        os.rename(tmp, folder / name)
        self.counts = defaultdict(Counter)


def collect(area: Path, folder: str) -> dict[str, Counter[str]]:
    """Sum and remove every worker's hand-over file in `folder`."""
    total: defaultdict[str, Counter[str]] = defaultdict(Counter)
    directory = area / folder
    if not directory.is_dir():
        return total
    for path in directory.glob("[0-9]*.json"):
        try:
            data: dict[str, Any] = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            log.warning("dropping an unreadable hand-over %s/%s", folder, path.name)
        else:
            for client_key, counts in data.items():
                total[client_key].update(counts)
        with contextlib.suppress(OSError):
            path.unlink()
    return total
