"""Read an item record's status without building the record (replay of a big map).

A resumed map only needs to know which items ended and how; decoding a million
``OpRecord`` objects (and copying their results) to learn that is what made a resume
slow.  ``item_status`` is the one call to swap when the compact item-record format with
its own status probe lands in ``core.records``.
"""

from __future__ import annotations

import pickle
from operator import itemgetter
from typing import Any

from durable_mp.core.records import TERMINAL, OpRecord, OpStatus
from durable_mp.core.records import item_status as records_item_status

_STATUS = OpRecord._fields.index("status")


_COMPACT = ord("I")


def item_status(data: Any, _loads: Any = pickle.loads, _int: Any = int.from_bytes) -> str:
    """The status of an item record, given as an ``OpRecord`` or its ``dumps()`` bytes."""
    if data[0] == _COMPACT:  # a compact item record (``records.item_record``): always a plain success
        return records_item_status(data)
    if data.__class__ is bytes:  # the store's case: slicing the small header beats a memoryview
        status: str = _loads(data[5:5 + _int(data[1:5], "little")])[_STATUS]
        return status
    if isinstance(data, OpRecord):
        return data.status
    view = memoryview(data)
    size = int.from_bytes(view[1:5], "little")
    return pickle.loads(view[5:5 + size])[_STATUS]  # the header only; the result stays where it is


def is_terminal(data: Any) -> bool:
    return item_status(data) in TERMINAL


def succeeded(data: Any) -> bool:
    return item_status(data) == OpStatus.SUCCEEDED


def as_record(data: Any) -> OpRecord:
    """The full record, decoded only when someone needs more than its status."""
    return data if isinstance(data, OpRecord) else OpRecord.loads(data)


def split_terminal(records: dict[int, Any]) -> tuple[dict[int, Any], dict[int, bool], dict[int, Any]]:
    """``(ended, {index: succeeded} of ended, unfinished)``: item records split by one status probe each."""
    if records and _all_compact(records.values()):  # the usual resumed map: every record a plain success
        return records, dict.fromkeys(records, True), {}
    ended: dict[int, Any] = {}
    ok: dict[int, bool] = {}
    unfinished: dict[int, Any] = {}
    terminal, success = TERMINAL, OpStatus.SUCCEEDED
    for index, rec in records.items():
        status = item_status(rec)
        if status in terminal:
            ended[index] = rec
            ok[index] = status == success
        else:
            unfinished[index] = rec
    return ended, ok, unfinished


def _all_compact(records: Any) -> bool:
    """Every record is compact-item bytes (``item_record``), told by one C-level pass over first bytes."""
    try:
        firsts = bytes(map(_first, records))
    except (TypeError, IndexError):  # an OpRecord (its first field is a str) or an empty value
        return False
    return firsts.count(_COMPACT) == len(firsts)


_first = itemgetter(0)
