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


TERMINAL = frozenset({OpStatus.SUCCEEDED, OpStatus.FAILED})


class Attempt(NamedTuple):
    """One execution of a step or branch body, kept for history and the timeline."""

    number: int
    start_ts: float
    end_ts: float | None
    pid: int
    error: dict | None = None  # ErrorObject.to_dict() of a failed attempt


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
        return pickle.dumps(tuple(self), protocol=PICKLE_PROTOCOL)

    @classmethod
    def loads(cls, data: bytes | memoryview) -> "OpRecord":
        return cls(*pickle.loads(data))


def operation_id(parent_id: str | None, n: int) -> str:
    """Deterministic id of the n-th operation of a context, as in the reference SDK.

    ``n`` is the 1-based per-context counter for ordinary operations and the 0-based
    index for parallel/map branches.
    """
    raw = f"{parent_id}-{n}" if parent_id else str(n)
    return hashlib.blake2b(raw.encode()).hexdigest()[:64]


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
