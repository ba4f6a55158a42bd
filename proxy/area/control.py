"""The area's lifetime and its control words.

* The area is a directory on a tmpfs (default `/dev/shm/edge-proxy.<port>`), created by the main process
  (`Area`), which holds its `lock` by `flock` while it lives. No `multiprocessing.shared_memory`, so no
  resource tracker can unlink it when an attacher exits (gh-82300 on Python 3.11/3.12), and every process
  attaches by path, never by inheritance.
* `control` is a 4 KiB mmap of u64 words: a magic number, the published generation (stored by the
  publisher after the renames it announces: `proxy/area/publication.py`) and the leader's heartbeat
  (`time.monotonic_ns()`, system-wide on Linux), which the supervisor watches (`Heartbeat`). A worker's
  "anything new?" check is one aligned 8-byte read of the generation (tens of ns).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil
import time
from pathlib import Path

from proxy.area.names import CONTROL, LOCK, METRICS

CONTROL_SIZE = 4096
MAGIC = 0x45445052_4F585931  # "EDPROXY1"
_MAGIC, _GENERATION, _HEARTBEAT = 0, 1, 2
# Refuse to start when the area has less room than this: a few documents must fit.
MIN_FREE_BYTES = 4 * 1024 * 1024


class AreaError(Exception):
    """The area cannot be created or written (too small, in use, not writable); the message says why."""


def full_message(path: Path, free: int | None = None) -> str:
    room = f" ({free // 1024} KiB free)" if free is not None else ""
    return (
        f"shared-memory area {path} is full{room}: raise the size of its filesystem "
        "(docker run --shm-size=256m, or a Kubernetes emptyDir with medium: Memory and a larger sizeLimit) "
        "or set shared_memory_dir to a larger tmpfs"
    )


class Area:
    """The area's lifetime, owned by the main process: create (cleaning a dead predecessor's), remove."""

    def __init__(self, path: Path, min_free_bytes: int = MIN_FREE_BYTES) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self._lock_fd: int | None = None

    def create(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            raise AreaError(f"shared_memory_dir {parent} does not exist")
        if self.path.exists():
            self._take_over_leftover()
        try:
            self.path.mkdir(mode=0o700)
            self._lock_fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(self._lock_fd, str(os.getpid()).encode())
            stats = os.statvfs(self.path)
            free = stats.f_bavail * stats.f_frsize
            if free < self.min_free_bytes:
                raise AreaError(full_message(self.path, free))
            with open(self.path / CONTROL, "wb") as control:
                control.write(bytes(CONTROL_SIZE))
            with open(self.path / CONTROL, "r+b") as control:
                mm = mmap.mmap(control.fileno(), CONTROL_SIZE)
                words = memoryview(mm).cast("Q")
                words[_MAGIC] = MAGIC
                words.release()
                mm.close()
            (self.path / METRICS).mkdir()
        except AreaError:
            self.remove()
            raise
        except OSError as exc:
            self.remove()
            if exc.errno == errno.ENOSPC:
                raise AreaError(full_message(self.path)) from None
            raise AreaError(f"cannot create shared-memory area {self.path}: {exc}") from None

    def _take_over_leftover(self) -> None:
        """A directory already there: another live instance (refuse) or a killed one's leftovers (remove)."""
        lock = self.path / LOCK
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            self._remove_leftover()
            return
        except PermissionError:
            raise AreaError(self._not_ours()) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AreaError(
                f"shared-memory area {self.path} is in use by a running edge-proxy (pid {owner}); "
                "use another port or shared_memory_dir"
            ) from None
        os.close(fd)
        self._remove_leftover()

    def _remove_leftover(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.path.exists():
            raise AreaError(self._not_ours())

    def _not_ours(self) -> str:
        try:
            owner = f"uid {self.path.stat().st_uid}"
        except OSError:
            owner = "another user"
        return (
            f"shared-memory area {self.path} exists and cannot be taken over (owned by {owner}, we are uid "
            f"{os.getuid()}): remove it, or use another port or shared_memory_dir"
        )

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class Control:
    """The control words, mapped: read-only for workers and the supervisor, writable for the leader."""

    def __init__(self, path: Path, writable: bool = False) -> None:
        with open(path / CONTROL, "r+b" if writable else "rb") as control:
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._mm = mmap.mmap(control.fileno(), CONTROL_SIZE, access=access)
        self._words = memoryview(self._mm).cast("Q")
        if self._words[_MAGIC] != MAGIC:
            self.close()
            raise AreaError(f"{path / CONTROL} is not an edge-proxy control file")

    @property
    def generation(self) -> int:
        return int(self._words[_GENERATION])

    @generation.setter
    def generation(self, value: int) -> None:
        self._words[_GENERATION] = value

    def beat(self) -> None:
        self._words[_HEARTBEAT] = time.monotonic_ns()

    @property
    def heartbeat(self) -> int:
        return int(self._words[_HEARTBEAT])

    def close(self) -> None:
        self._words.release()
        self._mm.close()


class Heartbeat:
    """The supervisor's view of the leader's heartbeat word."""

    def __init__(self, path: Path) -> None:
        self._control = Control(path)

    def read(self) -> int:
        """The last beat, `time.monotonic_ns()` in the leader; 0 before any leader beat."""
        return self._control.heartbeat

    def close(self) -> None:
        self._control.close()
