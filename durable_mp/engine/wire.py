"""Framing of the messages between driver and workers: pickle protocol 5, large records out of band.

``multiprocessing.Connection.recv_bytes`` reassembles a large message in a growing
``BytesIO`` (several copies of a 16 MB result), and pickling a message copies every
``bytes`` inside it once more.  Here a large record travels as its own frame, written
straight from its buffers (a numpy result is sent from the array's own memory, see
``serdes.pickle_parts``) and read straight into one preallocated buffer.  The message
refers to such a frame by number (pickle's persistent ids).  Frames use
``Connection``'s own framing (``!i`` length, ``-1`` + ``!Q`` for huge ones).

The driver's end of each pipe is non-blocking and every read or write there also
watches the worker's *sentinel* (a pidfd): a worker that dies in the middle of a
message, while a helper process it forked still holds the pipe open, must not leave
the driver waiting for bytes that will never come.
"""

from __future__ import annotations

import io
import os
import pickle
import select
import struct
from typing import Any

from durable_mp.core.vocabulary import PICKLE_PROTOCOL

OUT_OF_BAND_BYTES = 64 * 1024  # records above this size travel as their own frame
_COUNT = struct.Struct("!I")
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


class _Pickler(pickle.Pickler):
    def __init__(self, file: Any) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self.gathered: list[Gather] = []

    def persistent_id(self, obj: Any) -> Any:
        if obj.__class__ is Gather:
            self.gathered.append(obj)
            return len(self.gathered) - 1
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, frames: list[bytearray]) -> None:
        super().__init__(file)
        self.frames = frames

    def persistent_load(self, pid: Any) -> Any:
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
    _COUNT.pack_into(view, 0, len(pickler.gathered))
    _write(fd, _header(view.nbytes), sentinel)
    _write(fd, view, sentinel)
    for frame in pickler.gathered:
        _write(fd, _header(frame.nbytes), sentinel)
        for part in frame.parts:
            _write(fd, part, sentinel)


def recv(conn: Any, sentinel: int | None = None) -> Any:
    """Read one message; raises ``EOFError`` when the other side is gone (or died mid-message)."""
    fd = conn.fileno()
    first = _frame(fd, sentinel)
    (count,) = _COUNT.unpack_from(first)
    if not count:
        return pickle.loads(memoryview(first)[_COUNT.size:])
    frames = [_frame(fd, sentinel) for _ in range(count)]
    return _Unpickler(io.BytesIO(memoryview(first)[_COUNT.size:]), frames).load()


def _header(size: int) -> bytes:
    return _SHORT.pack(size) if size <= _MAX_SHORT else _SHORT.pack(-1) + _LONG.pack(size)


def _write(fd: int, data: Any, sentinel: int | None) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            _wait(fd, sentinel, write=True)


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
