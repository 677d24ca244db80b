"""Checkpoint records: the one shape every operation takes in the store and on the wire.

A record is a ``NamedTuple`` because it is created, pickled and shipped for every map item
on the hot path; a tuple pickles several times faster than a dataclass.  Records are
immutable: an operation that moves on (retry, success) produces a new record with
``_replace``.
"""

from __future__ import annotations

import pickle
import struct
from binascii import hexlify as _hexlify
from typing import Any, NamedTuple

from durable_mp.core.runs import run_start
from durable_mp.core.vocabulary import PICKLE_PROTOCOL as PICKLE_PROTOCOL

try:  # CPython's own blake2b: ``hashlib`` would also load OpenSSL, 2 ms of every fresh worker's start
    from _blake2 import blake2b as blake2b
except ImportError:  # another implementation
    from hashlib import blake2b as blake2b


class OpType:
    """Operation types (values match the reference's ``OperationType``)."""

    EXECUTION = "EXECUTION"
    CONTEXT = "CONTEXT"
    STEP = "STEP"
    WAIT = "WAIT"
    CALLBACK = "CALLBACK"


class OpStatus:
    """Operation statuses (values match the reference's ``OperationStatus``).

    ``PENDING`` marks a step whose last attempt failed and whose retry is scheduled.
    """

    STARTED = "STARTED"
    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"  # a callback nobody completed in time (the reference's status)


TERMINAL = frozenset({OpStatus.SUCCEEDED, OpStatus.FAILED, OpStatus.TIMED_OUT})


class Attempt(NamedTuple):
    """One execution of a step or branch body, kept for history and the timeline."""

    number: int
    start_ts: float
    end_ts: float | None
    pid: int
    error: dict | None = None  # ErrorObject.to_dict() of a failed attempt
    retry_delay: float | None = None  # seconds the retry strategy chose after this attempt, if it retried


class OpRecord(NamedTuple):
    """The checkpoint of one operation.

    ``result`` holds the serialized payload (``bytes`` from pickle, ``str`` from JSON
    serdes) exactly as the operation's SerDes produced it; ``error`` is an
    ``ErrorObject.to_dict()``.  ``attempts`` lists finished or running attempts in order.
    """

    op_id: str
    parent_id: str  # "" for operations of the root context
    op_type: str
    sub_type: str
    name: str | None
    status: str
    start_ts: float
    end_ts: float | None = None
    result: bytes | str | None = None
    error: dict | None = None
    attempt: int = 0  # attempts made so far
    next_attempt_ts: float | None = None
    attempts: tuple = ()
    pid: int = 0  # process that produced the latest state
    extra: dict | None = None  # type-specific details (wait end, batch summary, ...)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    def dumps(self) -> bytes:
        """``kind | header length | pickled fields without result | raw result``.

        The result travels outside the pickle, so a large payload is copied once, and a
        reader that only needs the result slices it out without decoding the rest.
        """
        return b"".join(self.dumps_parts())

    def dumps_parts(self) -> list:
        """``dumps()`` as a list of buffers, so a large result is never copied to join them.

        ``result`` may be a list of buffers itself (``serdes.Parts``) whose concatenation is
        the payload.
        """
        result = self.result
        if result is None:
            kind, raw = _NONE, []
        elif result.__class__ is str:
            kind, raw = _TEXT, [result.encode()]
        elif isinstance(result, list):
            kind, raw = _BYTES, result
        else:
            kind, raw = _BYTES, [result]
        fields = tuple(self)
        header = pickle.dumps(fields[:_RESULT] + (None,) + fields[_RESULT + 1:], protocol=PICKLE_PROTOCOL)
        head = kind + len(header).to_bytes(4, "little") + header
        if len(raw) == 1 and len(raw[0]) <= _SMALL_BYTES:  # one small buffer: one bytes object
            return [head + raw[0]]
        return [head, *raw]

    @classmethod
    def loads(cls, data: bytes | memoryview) -> "OpRecord":
        view = memoryview(data)
        if view[0] == _ITEM_ORD:
            return _load_item(view)
        size = int.from_bytes(view[1:5], "little")
        rec = cls(*pickle.loads(view[5:5 + size]))
        kind = view[0:1].tobytes()
        if kind == _NONE:
            return rec
        raw = view[5 + size:].tobytes()
        return rec._replace(result=raw.decode() if kind == _TEXT else raw)


_NONE, _TEXT, _BYTES = b"N", b"S", b"B"
_BYTES_ORD = _BYTES[0]
_RESULT = OpRecord._fields.index("result")
_SMALL_BYTES = 64 * 1024  # results up to this size are copied into the record's bytes


def result_view(data: bytes) -> Any:
    """The raw result inside record bytes (either format), without decoding the record.

    None unless the result is bytes.  Small results come back as ``bytes`` (a slice is
    cheaper than a view), large ones as a ``memoryview`` (no copy).
    """
    kind, start = result_span(data)
    if kind != _BYTES:
        return None
    if len(data) - start <= _SMALL_BYTES and data.__class__ is bytes:
        return data[start:]
    return memoryview(data)[start:]


def result_span(data: Any) -> tuple[bytes, int]:
    """(result kind ``N``/``S``/``B``, offset of the raw result) of record bytes in either format."""
    if data[0] == _ITEM_ORD:
        f = _ITEM_HEAD.unpack_from(data, 1)
        return f[_ITEM_KIND], 1 + _ITEM_HEAD.size + f[4] + f[5] + f[6] + f[7]
    return bytes(data[0:1]), 5 + int.from_bytes(data[1:5], "little")


# -- the compact record of a succeeded batch item ------------------------------------------
# A map over a million tiny items writes a million of these, and a resumed run reads them
# back; a pickled OpRecord costs a pickler and a 15-tuple each way.  Only a plain success
# (no error, no extra, no earlier attempts) takes this form; everything else is an OpRecord.
#   b"I" | start, end (f64) | pid (u32) | attempt (u16) | len op_id, parent_id, sub_type (u8)
#        | len name (u16) | result kind (N/S/B) | op_id | parent_id | sub_type | name | result
_ITEM = b"I"
_ITEM_ORD = _ITEM[0]
_ITEM_HEAD = struct.Struct("<ddIHBBBHc")
_ITEM_PACK = struct.Struct("<c" + _ITEM_HEAD.format[1:]).pack  # the tag byte and the head in one call
_ITEM_KIND = 8
_ITEM_STATUS = "SUCCEEDED"


def item_prefix(parent_id: str, sub_type: str) -> tuple[bytes, bytes]:
    """The constant parts of a batch's compact item records: (parent_id, sub_type) bytes."""
    return parent_id.encode(), sub_type.encode()


def item_record(op_id: str, parent: bytes, sub_type: bytes, name: str, start: float, end: float, pid: int,
                result: bytes | str | None, attempt: int = 1) -> bytes:
    """The compact record of a succeeded batch item (``OpRecord.loads`` reads it back).

    ``parent`` and ``sub_type`` come from ``item_prefix``.  ``result`` is the serialized
    payload: ``str`` from a JSON serdes, ``bytes`` from pickle, or None.
    """
    kind, raw = _payload_kind(result)
    op = op_id.encode()
    label = name.encode()
    return b"".join((_ITEM, _ITEM_HEAD.pack(start, end, pid, attempt, len(op), len(parent), len(sub_type),
                                            len(label), kind), op, parent, sub_type, label, raw))


def _payload_kind(result: bytes | str | None) -> tuple[int, bytes]:
    """A compact record's payload: its kind byte and its bytes."""
    if result is None:
        return _NONE, b""
    if result.__class__ is str:
        return _TEXT, result.encode()  # type: ignore[union-attr]
    return _BYTES, result  # type: ignore[return-value]


class ItemEncoder:
    """``item_record`` for the items of one batch, with what they share encoded once.

    The worker's hot path: a map over tiny items builds one of these per chunk and calls
    ``text``/``record`` per item.  The bytes are exactly ``item_record``'s (a test pins it).
    """

    __slots__ = ("_middle", "_lp", "_ls")

    def __init__(self, parent: bytes, sub_type: bytes) -> None:
        self._middle = parent + sub_type
        self._lp = len(parent)
        self._ls = len(sub_type)

    def text(self, op: bytes, label: bytes, start: float, end: float, pid: int, result: str) -> bytes:
        """A success whose payload is JSON text (``str``): ``op`` and ``label`` already UTF-8."""
        raw = result.encode()
        return b"".join((_ITEM_PACK(_ITEM, start, end, pid, 1, len(op), self._lp, self._ls, len(label), _TEXT), op,
                         self._middle, label, raw))

    def record(self, op: bytes, label: bytes, start: float, end: float, pid: int, result: bytes | str | None
               ) -> bytes:
        """Any small payload (``item_record``'s ``result``)."""
        kind, raw = _payload_kind(result)
        return b"".join((_ITEM_PACK(_ITEM, start, end, pid, 1, len(op), self._lp, self._ls, len(label), kind), op,
                         self._middle, label, raw))


def item_status(data: Any) -> str:
    """The status of record bytes (either format); a compact item is read without decoding it."""
    if data[0] == _ITEM_ORD:
        return _ITEM_STATUS
    return OpRecord.loads(data).status


def _load_item(view: memoryview) -> OpRecord:
    start, end, pid, attempt, lo, lp, ls, ln, kind = _ITEM_HEAD.unpack_from(view, 1)
    at = 1 + _ITEM_HEAD.size
    head = view[at:at + lo + lp + ls + ln].tobytes()
    op_id, parent_id = head[:lo].decode(), head[lo:lo + lp].decode()
    sub_type, name = head[lo + lp:lo + lp + ls].decode(), head[lo + lp + ls:].decode()
    result: Any = None
    if kind != _NONE:
        raw = view[at + lo + lp + ls + ln:].tobytes()
        result = raw.decode() if kind == _TEXT else raw
    return OpRecord(op_id, parent_id, OpType.CONTEXT, sub_type, name, _ITEM_STATUS, start, end, result, None,
                    attempt, None, (), pid, None)


def operation_id(parent_id: str | None, n: int) -> str:
    """Deterministic id of the n-th operation of a context, as in the reference SDK.

    ``n`` is the 1-based per-context counter for ordinary operations and the 0-based
    index for parallel/map branches.
    """
    raw = f"{parent_id}-{n}" if parent_id else str(n)
    return blake2b(raw.encode()).hexdigest()[:64]


def branch_id_bytes(raw: bytes) -> bytes:
    """``operation_id(parent, n).encode()`` for ``raw == f"{parent}-{n}".encode()`` (a non-empty parent).

    The first 32 bytes of the digest in hex are the first 64 hex digits ``operation_id``
    keeps; built here without the 128-digit string it slices.  A test pins the equality.
    """
    return _hexlify(blake2b(raw).digest()[:32])


def branch_key(index: int) -> str:
    """Store key component of a batch item's record: its index, zero-padded.

    Item records of a batch are keyed by index rather than by their (hashed) op id, so a
    commit of consecutive items appends to the B-tree instead of rewriting a random page
    per record; the record itself still carries its op id.
    """
    return _BRANCH_KEY_FORMAT % index


BRANCH_KEY_PREFIX = "#"
_BRANCH_KEY_FORMAT = BRANCH_KEY_PREFIX + "%012d"
branch_keys = _BRANCH_KEY_FORMAT.__mod__  # ``branch_key`` without a Python frame: ``map(branch_keys, indices)``
_KEY_BLOCK = 1000  # a consecutive run's keys: a shared head per thousand indices, and the last three digits
_KEY_TAILS = [f"{tail:03d}" for tail in range(_KEY_BLOCK)]


def branch_key_list(indices: list[int]) -> list[str]:
    """``[branch_key(i) for i in indices]``, at a string concatenation a key for a consecutive run.

    Formatting an int costs more than everything else the driver does to stage an item's
    record; a map's chunks are consecutive runs, whose keys share all but their last
    digits.  ``branch_key(i)`` is ``head(i // 1000) + "%03d" % (i % 1000)`` (a test pins it).
    """
    first = run_start(indices)
    if first is None:
        return list(map(branch_keys, indices))
    end = first + len(indices)
    keys: list[str] = []
    block = first // _KEY_BLOCK
    while block * _KEY_BLOCK < end:
        base = block * _KEY_BLOCK
        head = f"{BRANCH_KEY_PREFIX}{block:09d}"
        keys.extend(map(head.__add__, _KEY_TAILS[max(first, base) - base:min(end, base + _KEY_BLOCK) - base]))
        block += 1
    return keys


def identity_mismatch(rec: OpRecord, op_type: str, sub_type: str, name: Any, parent_id: str) -> str | None:
    """Describe how a checkpoint differs from the operation now being replayed, or None."""
    for field, stored, current in (
        ("type", rec.op_type, op_type),
        ("sub_type", rec.sub_type, sub_type),
        ("name", rec.name, name),
        ("parent", rec.parent_id, parent_id),
    ):
        if stored != current:
            return f"{field} checkpoint={stored!r} current={current!r}"
    return None
