"""Which processes write metrics, so the leader can tidy up after the ones that died.

Granian has no hook for a worker's exit, and prometheus-client keeps a dead process's `live*` gauge
files (its generation, its cache size) until someone calls `mark_process_dead`. So every worker and
every leader registers itself in `<area>/processes/<pid>` (its role and start time, which tells a dead
process from a new one that reuses the pid); the leader's `reap` checks them about once a second.
Counters and histograms of dead processes are kept on purpose: what they counted stays counted.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from prometheus_client import multiprocess

FOLDER = "processes"
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
        multiprocess.mark_process_dead(pid, str(metrics_dir))
        with contextlib.suppress(OSError):
            entry.unlink()
        gone.append(role)
    return gone
