"""Files only the proxy's user may read: the snapshot directory (0700) and what the leader writes there (0600).

Snapshots hold whole server-side documents (identity overrides with their identifiers included), and the
pending counts name environments by client key, so nothing there is for other users, whatever the umask.

The directory: created 0700 (chmod after mkdir, since mkdir's mode is cut by the umask). An existing one
wider than 0700 is tightened when it is ours: owned by this user and holding only files this proxy writes
(earlier versions created it 0755 and wrote 0644 files; those files are tightened to 0600 too). Anything else
(another owner, such as the root of a Kubernetes volume, or other files in it) is the operator's: it is left
as it is with one warning, since every file the proxy writes is 0600 anyway and a wider directory only shows
their names (hashes of client keys).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("proxy.leader")

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


def _ours(path: Path, patterns: Iterable[str]) -> bool:
    return any(path.match(pattern) for pattern in patterns)


def prepare_directory(directory: Path, patterns: Iterable[str], what: str, report: bool = True) -> None:
    """Create `directory` 0700, or tighten an existing one that holds only `patterns` files (else warn,
    unless `report` is off: another process of this proxy already did)."""
    patterns = tuple(patterns)
    try:
        directory.mkdir(parents=True)
        os.chmod(directory, DIRECTORY_MODE)
        return
    except FileExistsError:
        pass
    info = directory.stat()
    mode = stat.S_IMODE(info.st_mode)
    mine = info.st_uid == os.geteuid()
    entries = list(directory.iterdir())
    if mode & 0o077:
        if mine and all(_ours(entry, patterns) for entry in entries):
            os.chmod(directory, DIRECTORY_MODE)
            log.info("%s %s: mode %04o tightened to %04o", what, directory, mode, DIRECTORY_MODE)
        elif report:
            log.warning(
                "%s %s is mode %04o (%s): left as it is; the proxy's files in it are %04o, but other users can "
                "list them. Use a directory of its own (the proxy creates it %04o), or chmod it %04o",
                what,
                directory,
                mode,
                "not owned by this user" if not mine else "it holds files the proxy did not write",
                FILE_MODE,
                DIRECTORY_MODE,
                DIRECTORY_MODE,
            )
    for entry in entries:
        if not _ours(entry, patterns):
            continue
        with contextlib.suppress(OSError):  # a file another replica's user owns is theirs to fix
            info = entry.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
                os.chmod(entry, FILE_MODE)


def open_private(path: Path, flags: int) -> int:
    """`os.open` with O_CREAT, the file 0600 whatever the umask (when this user owns it)."""
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        info = os.fstat(fd)
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, data: bytes, fsync: bool = False) -> None:
    """Write `data` to `path` atomically (a 0600 temporary renamed into place)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            if fsync:
                out.flush()
                os.fsync(out.fileno())
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
