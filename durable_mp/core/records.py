"""Checkpoint records: the one shape every operation takes in the store and on the wire.

A record is a ``NamedTuple`` because it is created, pickled and shipped for every map item
on the hot path; a tuple pickles several times faster than a dataclass.  Records are
immutable: an operation that moves on (retry, success) produces a new record with
``_replace``.
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Any, NamedTuple

PICKLE_PROTOCOL = 5


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
    """The raw result inside ``OpRecord.dumps()`` bytes, without decoding the record.

    None unless the result is bytes.  Small results come back as ``bytes`` (a slice is
    cheaper than a view), large ones as a ``memoryview`` (no copy).
    """
    if data[0] != _BYTES_ORD:
        return None
    start = 5 + int.from_bytes(data[1:5], "little")
    if len(data) - start <= _SMALL_BYTES and data.__class__ is bytes:
        return data[start:]
    return memoryview(data)[start:]


def operation_id(parent_id: str | None, n: int) -> str:
    """Deterministic id of the n-th operation of a context, as in the reference SDK.

    ``n`` is the 1-based per-context counter for ordinary operations and the 0-based
    index for parallel/map branches.
    """
    raw = f"{parent_id}-{n}" if parent_id else str(n)
    return hashlib.blake2b(raw.encode()).hexdigest()[:64]


def branch_key(index: int) -> str:
    """Store key component of a batch item's record: its index, zero-padded.

    Item records of a batch are keyed by index rather than by their (hashed) op id, so a
    commit of consecutive items appends to the B-tree instead of rewriting a random page
    per record; the record itself still carries its op id.
    """
    return f"{BRANCH_KEY_PREFIX}{index:012d}"


BRANCH_KEY_PREFIX = "#"


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
