"""The reference LMDB holds for a checkpoint value that lives in a blob file.

Two writers append values to blob files under ``<store>/blobs/<blake2b(exec_id)>/``: the
driver's committer (``store.blobs.BlobWriter``, files ``<32 hex>.blob``) and, for a large
result, the worker that produced it (``engine.result_blobs``, files ``w<32 hex>.blob``).
A reference says where the value's bytes are: ``PREFIX``, a version byte, offset and length
in the file, then the file's path relative to the store.  A worker's reference (version 2)
also carries the CRC-32 of the bytes, which every read from the store checks: the worker
wrote them, so the driver never has to read them to commit their reference.

Here, not in ``store``: a worker writes references without importing the store (and LMDB).
"""

from __future__ import annotations

import re
import struct
import zlib
from typing import Any, NamedTuple

from durable_mp.core.records import blake2b  # CPython's own: hashlib would load OpenSSL in every worker

# No record starts with NUL (``OpRecord.dumps`` starts with b"N", b"S", b"B" or b"I"), so the two never mix.
PREFIX = b"\x00dmpblob"
V1 = PREFIX + b"1"  # offset, length (the driver's committer)
V2 = PREFIX + b"2"  # offset, length, crc32 (a worker)
_POS1 = struct.Struct("<QQ")
_POS2 = struct.Struct("<QQI")
BLOBS_DIR = "blobs"
WORKER_PREFIX = "w"  # a worker's file: ``w<32 hex>.blob``
NAME = re.compile(r"^blobs/[0-9a-f]{32}/w?[0-9a-f]{32}\.blob$")


class Ref(NamedTuple):
    """A parsed reference; ``crc`` is None for a version 1 reference (none was recorded)."""

    offset: int
    size: int
    crc: int | None
    rel: str  # the file, relative to the store

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]


def is_ref(data: Any) -> bool:
    head = data[:len(V1)]
    return bool(head == V1 or head == V2)


def parse(data: Any) -> Ref:
    """The reference in ``data`` (``is_ref``); ``ValueError`` if its file name is malformed."""
    view = memoryview(data)
    if bytes(view[:len(V1)]) == V2:
        offset, size, crc = _POS2.unpack_from(view, len(V2))
        rel_bytes = bytes(view[len(V2) + _POS2.size:])
    else:
        offset, size = _POS1.unpack_from(view, len(V1))
        crc = None
        rel_bytes = bytes(view[len(V1) + _POS1.size:])
    rel = rel_bytes.decode("ascii", errors="replace")
    if not NAME.match(rel):
        raise ValueError(f"malformed blob reference {rel_bytes!r}")
    return Ref(offset, size, crc, rel)


def pack_v1(offset: int, size: int, rel: bytes) -> bytes:
    return V1 + _POS1.pack(offset, size) + rel


def pack_v2(offset: int, size: int, crc: int, rel: str) -> bytes:
    return V2 + _POS2.pack(offset, size, crc) + rel.encode()


def crc32(parts: Any) -> int:
    """The CRC-32 of the concatenation of ``parts`` (buffers)."""
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


def exec_dir_name(exec_key: bytes) -> str:
    """The directory (under ``BLOBS_DIR``) of one execution's blob files."""
    return blake2b(exec_key, digest_size=16).hexdigest()


def is_worker_file(name: str) -> bool:
    return name.startswith(WORKER_PREFIX)
