"""Which processes write metrics, so the leader can tidy up after the ones that died.

Granian has no hook for a worker's exit, and prometheus-client keeps a dead process's `live*` gauge
files (its generation, its cache size) until someone calls `mark_process_dead`. So every worker and
every leader registers itself in `<area>/processes/<pid>` (its role and start time, which tells a dead
process from a new one that reuses the pid); the leader's `reap` checks them about once a second.
Counters and histograms of dead processes must stay counted (a total that drops reads as a reset), but
their files must not pile up in the area (a respawned worker leaves ~24 KiB): `reap` folds each dead
process's counters and histograms into one archive file per type and deletes its files, under an exclusive
lock that `/metrics` readers take shared, so no scrape sees a count twice or not at all. The leader never
waits for that lock (a flood of scrapes could hold it off for good and stall its loop): a dead process
whose files could not be archived waits as `<pid>.dead` for a later round.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import multiprocess
from prometheus_client.mmap_dict import MmapedDict

from proxy.area.names import ARCHIVE_LOCK, DEAD, PROCESSES, temporary

ARCHIVED_TYPES = ("counter", "histogram", "summary")  # per-process files named <type>_<pid>.db
WORKER = "worker"
LEADER = "leader"
ARCHIVE_WARN_AFTER = 60.0  # seconds dead processes' files may wait for the archive lock before we say so

log = logging.getLogger("proxy.leader")


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
    folder = area / PROCESSES
    folder.mkdir(exist_ok=True)
    pid = os.getpid()
    tmp = temporary(folder / str(pid))
    tmp.write_text(f"{role} {_start_time(pid) or ''}")
    os.rename(tmp, folder / str(pid))


def reap(area: Path, metrics_dir: Path) -> list[str]:
    """Forget the registered processes that are gone: drop their live gauges, fold their counters into the
    archive when its lock is free; their roles, one per process, the round each is found dead."""
    folder = area / PROCESSES
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
        marker = folder / f"{pid}{DEAD}"
        with contextlib.suppress(OSError):
            os.replace(entry, marker)  # its counters wait here until archived, across leader restarts too
            os.utime(marker)  # since when they wait
        gone.append(role)
    archive_dead(folder, metrics_dir)
    return gone


def archive_dead(folder: Path, metrics_dir: Path) -> None:
    """Archive every dead process waiting in `folder`, or none of them when a scrape holds the lock now.

    Never waits for the lock: this runs on the leader's loop, and scrapes whose shared locks overlap
    could hold off an exclusive `flock` for as long as they keep coming (the heartbeat would stop and the
    supervisor kill the leader). The dead files wait for a round with no scrape in progress instead.
    """
    markers = [entry for entry in folder.iterdir() if entry.name.endswith(DEAD)]
    if not markers:
        return
    live = {entry.name for entry in folder.iterdir() if entry.name.isdigit()}
    # a live process that reuses a dead one's pid has taken over its files (prometheus-client continues
    # the values it finds): those are not archived, or they would count twice
    pids = [int(marker.name.removesuffix(DEAD)) for marker in markers]
    if not archive(metrics_dir, [pid for pid in pids if str(pid) not in live]):
        _starved(markers)
        return
    for marker in markers:
        with contextlib.suppress(OSError):
            marker.unlink()


def _starved(markers: list[Path]) -> None:
    try:
        waited = time.time() - min(marker.stat().st_mtime for marker in markers)
    except (OSError, ValueError):
        return
    if waited < ARCHIVE_WARN_AFTER:
        return
    log.warning(
        "metrics of %d dead process(es) have waited %.0fs for the archive lock: /metrics scrapes hold it "
        "without a gap; their files stay in the area until one comes",
        len(markers),
        waited,
    )
    for marker in markers:  # the next warning a period later
        with contextlib.suppress(OSError):
            os.utime(marker)


@contextlib.contextmanager
def archive_lock(metrics_dir: Path) -> Iterator[None]:
    """Shared, for a scrape's reads (it waits for an archiving in progress: a few files, milliseconds)."""
    fd = os.open(metrics_dir / ARCHIVE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # and with it the lock


def archive(metrics_dir: Path, pids: list[int]) -> bool:
    """Add dead processes' counter, histogram and summary values into `<type>_archive.db` (summing is what
    the collector does across files anyway) and delete their files; False, with nothing done, when a scrape
    holds the lock at this moment."""
    fd = os.open(metrics_dir / ARCHIVE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        for pid in pids:
            _fold(metrics_dir, pid)
        return True
    finally:
        os.close(fd)  # and with it the lock


def _fold(metrics_dir: Path, pid: int) -> None:
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
