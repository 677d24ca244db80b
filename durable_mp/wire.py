"""Messages between driver and workers: pickle protocol 5, large buffers out of band.

``multiprocessing.Connection.recv_bytes`` reassembles a large message in a growing
``BytesIO`` (several copies of a 16 MB result), and pickling a message copies every
``bytes`` inside it once more.  Here a message is a pickle whose large buffers (record
bytes wrapped in ``pickle.PickleBuffer``) travel as separate frames, written straight
from their memory and read straight into preallocated buffers.  Frames use
``Connection``'s own framing (``!i`` length, ``-1`` + ``!Q`` for huge ones), so
``send_bytes`` does the writing.
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any

from durable_mp.records import PICKLE_PROTOCOL

OUT_OF_BAND_BYTES = 64 * 1024  # record bytes above this size travel as their own frame
_COUNT = struct.Struct("!I")
_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")


def big(data: bytes) -> Any:
    """Mark a buffer to travel out of band if it is large (the receiver gets a memoryview)."""
    return pickle.PickleBuffer(data) if len(data) > OUT_OF_BAND_BYTES else data


def send(conn: Any, msg: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    header = pickle.dumps(msg, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append)
    conn.send_bytes(_COUNT.pack(len(buffers)) + header)
    for buf in buffers:
        conn.send_bytes(buf.raw())


def recv(conn: Any) -> Any:
    """Read one message; raises ``EOFError`` when the other side is gone."""
    fd = conn.fileno()
    first = _frame(fd)
    (count,) = _COUNT.unpack_from(first)
    buffers = [_frame(fd) for _ in range(count)]
    return pickle.loads(memoryview(first)[_COUNT.size:], buffers=buffers)


def _frame(fd: int) -> bytearray:
    (size,) = _SHORT.unpack(_exactly(fd, _SHORT.size))
    if size == -1:
        (size,) = _LONG.unpack(_exactly(fd, _LONG.size))
    return _exactly(fd, size)


def _exactly(fd: int, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError("the other side of the pipe is gone")
        got += n
    return buf
