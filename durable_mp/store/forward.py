"""A record's status only moves forward (docs/architecture.md "Invariants", invariants where the state lives).

STARTED → PENDING → a terminal status (SUCCEEDED, FAILED, TIMED_OUT).  A step's retry
starts a new attempt, so a step moves forward in (attempt, status): PENDING of attempt 1
→ STARTED of attempt 2 is forward, STARTED of attempt 1 after PENDING of attempt 1 is
not.  A terminal record is never replaced, except by the same bytes (a record written
twice) or by an explicit reopen (fix-and-resume, ``Store.reopen``).

The store asks ``backwards(old, new)`` only when a key it writes already holds a record
(staged, or committed), so a map writing fresh items pays one dict or B-tree probe per
item and never decodes a record.
"""

from __future__ import annotations

import pickle
from typing import Any

from durable_mp.core.errors import InvariantError
from durable_mp.core.records import TERMINAL, OpStatus, OpType

_COMPACT = ord("I")  # core.records.item_record: a plain succeeded batch item
_FIELDS_OP_TYPE, _FIELDS_STATUS, _FIELDS_ATTEMPT = 2, 5, 10
_RANK = {OpStatus.STARTED: 0, OpStatus.PENDING: 1}
_TERMINAL_RANK = 2


class RecordMovedBackwards(InvariantError):
    """A write would move an operation's record backwards (an older record after a newer one)."""


def progress(data: Any) -> tuple[str, str, int]:
    """``(op type, status, attempt)`` of record bytes (either format), decoding only the header."""
    if data[0] == _COMPACT:
        return OpType.CONTEXT, OpStatus.SUCCEEDED, 1
    view = memoryview(data)
    size = int.from_bytes(view[1:5], "little")
    fields = pickle.loads(view[5:5 + size])
    return fields[_FIELDS_OP_TYPE], fields[_FIELDS_STATUS], fields[_FIELDS_ATTEMPT]


def backwards(old: Any, new: Any) -> str | None:
    """How writing ``new`` over ``old`` would move the record backwards, or None if it moves forward."""
    old_type, old_status, old_attempt = progress(old)
    new_type, new_status, new_attempt = progress(new)
    if old_status in TERMINAL:
        if bytes(old) == bytes(new):
            return None
        return f"{old_status} -> {new_status}: a terminal record is replaced only by a reopen"
    if new_status in TERMINAL:
        return None
    if new_type == OpType.STEP and old_type == OpType.STEP:
        before = (old_attempt, _RANK.get(old_status, _TERMINAL_RANK))
        after = (new_attempt, _RANK.get(new_status, _TERMINAL_RANK))
        if after < before:
            return f"{old_status} (attempt {old_attempt}) -> {new_status} (attempt {new_attempt})"
    return None


def refusal(where: str, how: str) -> RecordMovedBackwards:
    return RecordMovedBackwards(
        f"durable_mp internal error: refused to write checkpoint {where}: it would move backwards ({how}). "
        f"The write was not applied; please report this with the execution's `durable-mp show` output.")


__all__ = ["RecordMovedBackwards", "backwards", "progress", "refusal"]
