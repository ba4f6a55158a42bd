"""Which processes write metrics, so the leader can tidy up after the ones that died.

Granian has no hook for a worker's exit, and prometheus-client keeps a dead process's `live*` gauge
files (its generation, its cache size) until someone calls `mark_process_dead`. So every worker and
every leader registers itself in `<area>/processes/<pid>` (its role and start time, which tells a dead
process from a new one that reuses the pid); the leader's `reap` checks them about once a second.
Counters and histograms of dead processes must stay counted (a total that drops reads as a reset), but
their files must not pile up in the area (a respawned worker leaves ~24 KiB): `reap` folds each dead
process's counters and histograms into one archive file per type and deletes its files, under an exclusive
lock that `/metrics` readers take shared, so no scrape sees a count twice or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import multiprocess
from prometheus_client.mmap_dict import MmapedDict

FOLDER = "processes"
ARCHIVED_TYPES = ("counter", "histogram", "summary")  # per-process files named <type>_<pid>.db
ARCHIVE_LOCK = ".archive.lock"  # not *.db: prometheus-client's collector reads every *.db in the folder
WORKER = "worker"
LEADER = "leader"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None when it is gone or a zombie."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command may hold spaces and parentheses
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(pid: int, started: str) -> bool:
    if started:
        return _start_time(pid) == started
    try:  # no /proc at registration: the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def register(area: Path, role: str) -> None:
    folder = area / FOLDER
    folder.mkdir(exist_ok=True)
    pid = os.getpid()
    tmp = folder / f".{pid}.tmp"
    tmp.write_text(f"{role} {_start_time(pid) or ''}")
    os.rename(tmp, folder / str(pid))


def reap(area: Path, metrics_dir: Path) -> list[str]:
    """Forget the registered processes that are gone: drop their live gauges; their roles, one per process."""
    folder = area / FOLDER
    if not folder.is_dir():
        return []
    gone: list[str] = []
    for entry in folder.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            role, _, started = entry.read_text().partition(" ")
        except OSError:
            continue
        pid = int(entry.name)
        if _alive(pid, started.strip()):
            continue
        multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]  # untyped upstream
        archive(metrics_dir, pid)
        with contextlib.suppress(OSError):
            entry.unlink()
        gone.append(role)
    return gone


@contextlib.contextmanager
def archive_lock(metrics_dir: Path, exclusive: bool) -> Iterator[None]:
    """Shared for a scrape's reads, exclusive while a dead process's files are folded into the archive."""
    fd = os.open(metrics_dir / ARCHIVE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # and with it the lock


def archive(metrics_dir: Path, pid: int) -> None:
    """Add a dead process's counter, histogram and summary values into `<type>_archive.db` (summing is
    what the collector does across files anyway) and delete its files."""
    with archive_lock(metrics_dir, exclusive=True):
        for kind in ARCHIVED_TYPES:
            dead = metrics_dir / f"{kind}_{pid}.db"
            if not dead.exists():
                continue
            values = MmapedDict.read_all_values_from_file(str(dead))  # type: ignore[no-untyped-call]
            if values:
                kept = MmapedDict(str(metrics_dir / f"{kind}_archive.db"))  # type: ignore[no-untyped-call]
                try:
                    for key, value, timestamp, _ in values:
                        so_far, _ = kept.read_value(key)  # type: ignore[no-untyped-call]
                        kept.write_value(key, so_far + value, timestamp)  # type: ignore[no-untyped-call]
                finally:
                    kept.close()  # type: ignore[no-untyped-call]
            dead.unlink()
