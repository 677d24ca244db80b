"""Framing of the messages between driver and workers: pickle protocol 5, large records out of band.

``multiprocessing.Connection.recv_bytes`` reassembles a large message in a growing
``BytesIO`` (several copies of a 16 MB result), and pickling a message copies every
``bytes`` inside it once more.  Here a large record travels as its own frame, written
straight from its buffers (a numpy result is sent from the array's own memory, see
``serdes.pickle_parts``) and read straight into one preallocated buffer.  The message
refers to such a frame by number (pickle's persistent ids).  Frames use
``Connection``'s own framing (``!i`` length, ``-1`` + ``!Q`` for huge ones).

A frame of many megabytes (a batch payload holding large map inputs) is built in a memory
file (``memfd``, ``MemoryFile``) and travels as a ``Shared`` frame: its descriptor passed
over the Unix socket (``SCM_RIGHTS``), so every worker maps the same pages instead of
reading its own copy through its pipe.  The receiver maps it copy-on-write: what a
branch does to its view never reaches another worker.

The driver's end of each pipe is non-blocking and every read or write there also
watches the worker's *sentinel* (a pidfd): a worker that dies in the middle of a
message, while a helper process it forked still holds the pipe open, must not leave
the driver waiting for bytes that will never come.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import pickle
import select
import socket
import struct
import weakref
from typing import Any

from durable_mp.core.vocabulary import PICKLE_PROTOCOL

OUT_OF_BAND_BYTES = 64 * 1024  # records above this size travel as their own frame
SHARE_BYTES = 1 << 20  # a batch payload from this size on is built in a memory file (engine.payload)
_COUNT = struct.Struct("!I")  # frames that follow | (descriptors that follow << _FD_SHIFT)
_FD_SHIFT = 24
_FRAMES = (1 << _FD_SHIFT) - 1
_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")
_MAX_SHORT = 0x7FFFFFFF


class Gather:
    """Buffers to send as one frame; the receiver gets them as one ``bytearray``."""

    __slots__ = ("parts", "nbytes")

    def __init__(self, parts: list[Any]) -> None:
        self.parts = [memoryview(part).cast("B") for part in parts]
        self.nbytes = sum(part.nbytes for part in self.parts)


def big(parts: list[Any]) -> Any:
    """A record's buffers: joined when small, a ``Gather`` frame when large."""
    if len(parts) == 1 and len(parts[0]) <= OUT_OF_BAND_BYTES:  # the common case: a small record
        return parts[0]
    total = sum(map(len, parts))  # bytes, or PickleBuffer.raw() views: len == bytes
    return Gather(parts) if total > OUT_OF_BAND_BYTES else b"".join(parts)


class Shared:
    """A frame in a memory file, sent as its descriptor; the receiver gets a copy-on-write ``mmap``.

    The sender closes its descriptor once the message is sent: a descriptor in flight, and
    every receiver's mapping, keep the pages alive on their own.
    """

    __slots__ = ("fd", "nbytes")

    def __init__(self, fd: int, nbytes: int) -> None:
        self.fd = fd
        self.nbytes = nbytes

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def can_share() -> bool:
    """Whether this platform can pass a frame as a memory file (Linux: ``memfd_create``)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds")


class MemoryFile(mmap.mmap):
    """Bytes already in a memory file (read-only view of it): ``share`` passes its descriptor
    as it is, without copying them; pickled (a Dask task's argument), it is their bytes."""

    fd: int

    def __reduce__(self) -> Any:
        return bytes, (self[:],)


def memory_file(size: int, writes: list[tuple[int, Any]]) -> MemoryFile:
    """A new memory file of ``size`` bytes holding each ``(offset, buffer)`` of ``writes``.

    Written with ``pwrite`` (the kernel copies into the file's pages; nothing is mapped
    writable here); the descriptor is closed when the returned object is collected.
    """
    fd = os.memfd_create("durable_mp-payload")
    try:
        os.ftruncate(fd, size)
        for offset, data in writes:
            _pwrite_all(fd, memoryview(data).cast("B"), offset)
        out = MemoryFile(fd, size, access=mmap.ACCESS_READ)
    except BaseException:
        os.close(fd)
        raise
    out.fd = fd
    weakref.finalize(out, os.close, fd)
    return out


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]


def shared_frame(frame: Any) -> Shared | None:
    """A ``Shared`` frame (a new descriptor of the same file) for a ``Gather`` of a ``MemoryFile``, else None."""
    if frame.__class__ is not Gather or len(frame.parts) != 1 or frame.parts[0].obj.__class__ is not MemoryFile:
        return None
    return Shared(os.dup(frame.parts[0].obj.fd), frame.nbytes)


class _Pickler(pickle.Pickler):
    def __init__(self, file: Any) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self.gathered: list[Gather] = []
        self.shared: list[Shared] = []

    def persistent_id(self, obj: Any) -> Any:
        if obj.__class__ is Gather:
            self.gathered.append(obj)
            return len(self.gathered) - 1
        if obj.__class__ is Shared:
            self.shared.append(obj)
            return ("fd", len(self.shared) - 1)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, frames: list[bytearray], shared: list[mmap.mmap]) -> None:
        super().__init__(file)
        self.frames = frames
        self.shared = shared

    def persistent_load(self, pid: Any) -> Any:
        if pid.__class__ is tuple:
            return self.shared[pid[1]]
        return self.frames[pid]


def send(conn: Any, msg: Any, *, gathered: bool = False, sentinel: int | None = None) -> None:
    """Send ``msg``; ``gathered=True`` when it may contain ``Gather`` objects (slower pickler)."""
    fd = conn.fileno()
    if not gathered:
        data = _COUNT.pack(0) + pickle.dumps(msg, protocol=PICKLE_PROTOCOL)
        _write(fd, _header(len(data)) + data, sentinel)
        return
    buf = io.BytesIO()
    buf.write(_COUNT.pack(0))
    pickler = _Pickler(buf)
    pickler.dump(msg)
    view = buf.getbuffer()
    _COUNT.pack_into(view, 0, len(pickler.gathered) | (len(pickler.shared) << _FD_SHIFT))
    _write(fd, _header(view.nbytes), sentinel)
    _write(fd, view, sentinel)
    for frame in pickler.gathered:
        _write(fd, _header(frame.nbytes), sentinel)
        for part in frame.parts:
            _write(fd, part, sentinel)
    for shared in pickler.shared:
        _send_fd(fd, shared.fd, sentinel)


def recv(conn: Any, sentinel: int | None = None) -> Any:
    """Read one message; raises ``EOFError`` when the other side is gone (or died mid-message)."""
    fd = conn.fileno()
    first = _frame(fd, sentinel)
    (count,) = _COUNT.unpack_from(first)
    if not count:
        return pickle.loads(memoryview(first)[_COUNT.size:])
    frames = [_frame(fd, sentinel) for _ in range(count & _FRAMES)]
    shared = [_map(_recv_fd(fd, sentinel)) for _ in range(count >> _FD_SHIFT)]
    return _Unpickler(io.BytesIO(memoryview(first)[_COUNT.size:]), frames, shared).load()


def _header(size: int) -> bytes:
    return _SHORT.pack(size) if size <= _MAX_SHORT else _SHORT.pack(-1) + _LONG.pack(size)


def _write(fd: int, data: Any, sentinel: int | None) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            _wait(fd, sentinel, write=True)


def _send_fd(fd: int, passed: int, sentinel: int | None) -> None:
    """One byte carrying ``passed`` (SCM_RIGHTS), right after the message's frames."""
    sock = socket.socket(fileno=fd)
    try:
        while True:
            try:
                if socket.send_fds(sock, [b"F"], [passed]):
                    return
            except BlockingIOError:
                pass
            _wait(fd, sentinel, write=True)
    finally:
        sock.detach()  # the Connection owns the descriptor


def _recv_fd(fd: int, sentinel: int | None) -> int:
    sock = socket.socket(fileno=fd)
    try:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
            except BlockingIOError:
                _wait(fd, sentinel, write=False)
                continue
            if not data:
                raise EOFError("the other side of the pipe is gone")
            if len(fds) != 1:
                for extra in fds:
                    os.close(extra)
                raise EOFError("a shared frame arrived without its descriptor")
            return fds[0]
    finally:
        sock.detach()


def _map(fd: int) -> mmap.mmap:
    """The memory file ``fd`` mapped copy-on-write (writable here, unchanged for everyone else)."""
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)


def _frame(fd: int, sentinel: int | None) -> bytearray:
    (size,) = _SHORT.unpack(_exactly(fd, _SHORT.size, sentinel))
    if size == -1:
        (size,) = _LONG.unpack(_exactly(fd, _LONG.size, sentinel))
    return _exactly(fd, size, sentinel)


def _exactly(fd: int, size: int, sentinel: int | None) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        try:
            n = os.readv(fd, [view[got:]])
        except BlockingIOError:
            _wait(fd, sentinel, write=False)
            continue
        if n == 0:
            raise EOFError("the other side of the pipe is gone")
        got += n
    return buf


def wait(handles: list[Any], timeout: float | None = None) -> list[Any]:
    """``multiprocessing.connection.wait`` for connections and descriptors (Linux, macOS), without its selector.

    The dispatcher waits once per wake-up on every busy worker's pipe and sentinel; the
    standard one builds a ``selectors`` object each time (about 20 µs for a few handles, a
    sizeable share of a tiny item's cost).  A handle is ready when its descriptor has
    anything to report: data, end of file or an error (as the standard one counts it).
    """
    if not hasattr(select, "poll"):  # Windows: durable_mp's pool needs POSIX anyway
        from multiprocessing.connection import wait as standard

        return standard(handles, timeout)
    poller = select.poll()
    by_fd: dict[int, list[Any]] = {}
    for handle in handles:
        fd = handle if handle.__class__ is int else handle.fileno()
        if fd not in by_fd:
            by_fd[fd] = []
            poller.register(fd, select.POLLIN)
        by_fd[fd].append(handle)
    ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
    return [handle for fd, _ in poller.poll(ms) for handle in by_fd[fd]]


def _wait(fd: int, sentinel: int | None, *, write: bool) -> None:
    """Block until ``fd`` is ready; raise ``EOFError`` if the process behind ``sentinel`` died first."""
    watch = [sentinel] if sentinel is not None else []
    readable, writable, _ = select.select(watch if write else [fd, *watch], [fd] if write else [], [])
    if (fd in writable) or (fd in readable):
        return
    # the worker is dead: whatever it wrote is readable now, or never will be
    ready = select.select([] if write else [fd], [fd] if write else [], [], 0)
    if not (ready[0] or ready[1]):
        if write:
            raise BrokenPipeError("the worker died while a message to it was being written")
        raise EOFError("the worker died in the middle of a message")
