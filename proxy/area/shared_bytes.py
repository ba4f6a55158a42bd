"""A read-only shared mapping of one immutable file in the area, holding no file descriptor.

Workers map every published document and its answers: the pages are the tmpfs file's own, so the node
holds one copy however many workers map it, and a page counts in a worker's RSS only once that worker
touches it. `mmap.mmap` would keep a duplicate descriptor per map on Python < 3.13 (its `trackfd=False`
came in 3.13): 10,000 environments would hold 20,000 descriptors per worker. So the file is mapped with
libc's `mmap` through ctypes and its descriptor closed at once; the mapping lives as long as the object.

Safety rests on one rule: nothing here hands out a pointer or a buffer into the mapping. Reads return
copies (`slice`), and `crc32` reads through a buffer that does not outlive the call, so no reader can
touch the pages after `munmap`. Published files are never written after their rename, so what is mapped
does not change under a reader.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import zlib
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


class SharedBytes:
    __slots__ = ("_address", "_length")

    def __init__(self, path: Path) -> None:
        """Map the whole of `path` read-only (FileNotFoundError when it is gone)."""
        self._address = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            self._length = os.fstat(fd).st_size
            if self._length:
                address = _mmap(None, self._length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                if address is None or address == _MAP_FAILED:
                    error = ctypes.get_errno()
                    raise OSError(error, f"mmap {path.name}: {os.strerror(error)}")
                self._address = address
        finally:
            os.close(fd)

    def __len__(self) -> int:
        return self._length

    def slice(self, start: int, length: int) -> bytes:
        """A copy of `length` bytes at `start` (clipped to the file)."""
        start = max(0, min(start, self._length))
        length = max(0, min(length, self._length - start))
        return ctypes.string_at(self._address + start, length) if length else b""

    def bytes(self) -> bytes:
        return self.slice(0, self._length)

    def crc32(self) -> int:
        if not self._length:
            return 0
        return zlib.crc32((ctypes.c_char * self._length).from_address(self._address))

    def release_pages(self) -> None:
        """Stop counting the pages read so far in this process's RSS (they stay in the file: a later read
        maps them again, a minor fault)."""
        if self._length:
            _madvise(self._address, self._length, mmap.MADV_DONTNEED)

    def __del__(self) -> None:
        if self._address:
            _munmap(self._address, self._length)
            self._address = 0
