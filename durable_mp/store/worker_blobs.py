"""The driver's side of a result a worker wrote into the store's directory (``engine.result_blobs``).

``adopt`` checks the worker's reference before anything is staged: it must name a worker
file of *this* execution, a regular file of ours that only we can read, holding the whole
extent, at a page boundary.  It does not read the bytes: the worker synced them and
recorded their CRC-32, which every later read from the store checks (``blobs.load``,
``durable-mp check``).  The bytes are mapped twice, without copying: read-only, as the record
to stage (``blobs.InPlace``, committed as the reference), and copy-on-write, for the value
handed to the caller (writes to it stay in this process).

The copy-on-write mapping is made with libc's ``mmap`` rather than ``mmap.mmap``, which
keeps a descriptor open per mapping: a map's results would run out of descriptors.  It is
unmapped when the last array using it is collected.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import pathlib
import stat
import weakref
from typing import Any

from durable_mp.core import blob_ref
from durable_mp.exceptions import StoreError
from durable_mp.store.blobs import InPlace


def adopt(root: pathlib.Path, exec_id: str, data: bytes) -> tuple[Any, memoryview | None]:
    """(the record as an ``InPlace`` to stage, a private writable view of it or None).

    Where files cannot be mapped, the record's bytes instead (then the committer writes them
    to a blob file of its own, as any large value).

    ``StoreError`` if the reference is not one a worker of this execution could have written.
    """
    try:
        ref = blob_ref.parse(data)
    except ValueError as exc:
        raise StoreError(f"a worker of execution {exec_id!r} sent a {exc}") from None
    folder = ref.rel.split("/")[1]
    if (ref.crc is None or not blob_ref.is_worker_file(ref.name) or folder != blob_ref.exec_dir_name(exec_id.encode())
            or ref.offset % mmap.ALLOCATIONGRANULARITY or not ref.size):
        raise StoreError(f"a worker of execution {exec_id!r} sent a blob reference that is not one of its own "
                         f"({ref.rel}, {ref.size} bytes at {ref.offset})")
    path = pathlib.Path(root) / ref.rel
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StoreError(f"the blob file {path} a worker just wrote cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise StoreError(f"the blob file {path} a worker wrote is not a private file of this user "
                             f"(mode {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid})")
        if st.st_size < ref.offset + ref.size:
            raise StoreError(f"the blob file {path} holds {st.st_size:,} bytes, fewer than the "
                             f"{ref.offset + ref.size:,} its worker reported written")
        try:
            blob = InPlace(fd, ref.size, offset=ref.offset, access=mmap.ACCESS_READ)
        except OSError:  # a file system that cannot map files: the bytes, committed again by the driver
            return _read(fd, ref, path), None
        blob.ref = bytes(data)
        return blob, private_view(fd, ref.offset, ref.size)
    finally:
        os.close(fd)


def _read(fd: int, ref: blob_ref.Ref, path: pathlib.Path) -> Any:
    data = bytearray(ref.size)
    view = memoryview(data)
    got = 0
    while got < ref.size:
        n = os.preadv(fd, [view[got:]], ref.offset + got)
        if not n:
            raise StoreError(f"the blob file {path} ended before the record its worker reported written")
        got += n
    return data


class _Libc:
    """libc's ``mmap``/``munmap``, or None where they cannot be called (then values are copied)."""

    def __init__(self) -> None:
        self.mmap: Any = None
        self.munmap: Any = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.mmap = libc.mmap
            self.munmap = libc.munmap
        except (OSError, AttributeError):
            self.mmap = self.munmap = None
            return
        self.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int64]
        self.mmap.restype = ctypes.c_void_p
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.munmap.restype = ctypes.c_int


_LIBC = _Libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def private_view(fd: int, offset: int, size: int) -> memoryview | None:
    """A writable copy-on-write view of ``size`` bytes of ``fd`` at ``offset`` (page-aligned), or None.

    None when it cannot be mapped (no libc ``mmap``, the process's mapping limit reached):
    the caller copies instead.
    """
    if _LIBC.mmap is None:
        return None
    addr = _LIBC.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        return None
    pages = (ctypes.c_ubyte * size).from_address(addr)
    weakref.finalize(pages, _LIBC.munmap, addr, size)  # once no view of it is left
    return memoryview(pages).cast("B")
