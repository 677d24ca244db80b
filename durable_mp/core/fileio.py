"""Durable file writes shared by the driver's and the workers' blob files (no store, no LMDB here)."""

from __future__ import annotations

import os
from typing import Any


def fsync_dir(path: Any) -> None:
    """Make the directory's entries (a new file's name) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None: then writeback simply starts at the ``fdatasync``."""
    import ctypes  # here, not at import: a worker process that never writes a blob does not load it

    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_SYNC_FILE_RANGE: list[Any] = []  # [the function or None], once looked up
_SYNC_FILE_RANGE_WRITE = 2  # start writing the dirty pages of the range; wait for nothing


def start_writeback(fd: int, offset: int, size: int) -> None:
    """Start writing ``size`` bytes at ``offset`` to the disk now, without waiting (a hint: the sync still follows)."""
    if not _SYNC_FILE_RANGE:
        _SYNC_FILE_RANGE.append(_load_sync_file_range())
    func = _SYNC_FILE_RANGE[0]
    if func is not None and size:
        func(fd, offset, size, _SYNC_FILE_RANGE_WRITE)


def write_all(fd: int, data: Any) -> int:
    """Write all of ``data`` at the file's position; how many bytes."""
    view = memoryview(data).cast("B")
    size = view.nbytes
    while view.nbytes:
        view = view[os.write(fd, view):]
    return size


def pwrite_all(fd: int, parts: list[memoryview], offset: int) -> int:
    """Write the byte views ``parts`` end to end at ``offset`` (``pwritev``, few syscalls); how many bytes."""
    total = 0
    while parts:
        n = os.pwritev(fd, parts, offset + total)
        total += n
        while parts and n >= parts[0].nbytes:
            n -= parts[0].nbytes
            parts = parts[1:]
        if parts and n:
            parts = [parts[0][n:], *parts[1:]]
    return total
