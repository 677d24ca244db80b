"""Outcomes of one batch's items stored as columns, not as one object per item.

A million-item map used to keep a ``BatchItem`` (an object plus its ``__dict__``) and a
dict entry per item on the driver: about 300 bytes an item before the results
themselves.  ``ItemColumns`` keeps one status byte and one list slot per item, failed
items' errors in a dict, and records not decoded yet (resume, custom serdes) in another.
``BatchResult`` is built on it and makes ``BatchItem`` objects only when asked for them.

While the dispatcher runs a batch it fills ``RunningColumns`` instead: values and records
only, since which items succeeded is already the batch's item table's to say
(``concurrency.item_table``).  The status column is derived from that table once, when
the batch has ended (``RunningColumns.seal``), so no item's state is written twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import compress
from typing import Any

from durable_mp.concurrency.item_table import ItemState, ItemTable
from durable_mp.core.bytemaps import fill_at, mask, positions
from durable_mp.core.completion import BatchItemStatus
from durable_mp.core.runs import run_start
from durable_mp.lambda_service import ErrorObject

# One status byte per item.  RAW: a record (``OpRecord`` or its bytes) not decoded yet.
ABSENT, SUCCEEDED, FAILED, STARTED, RAW = 0, 1, 2, 3, 4
_STATUS_OF = {BatchItemStatus.SUCCEEDED: SUCCEEDED, BatchItemStatus.FAILED: FAILED,
              BatchItemStatus.STARTED: STARTED}
AS_ITEM_STATUS = (None, BatchItemStatus.SUCCEEDED, BatchItemStatus.FAILED, BatchItemStatus.STARTED, None)
_ONE = b"\x01"


SUCCEEDED_MASK = mask(SUCCEEDED)


class ItemColumns:
    """Per-item outcomes of a batch of ``n`` items, indexed by item; absent items take a byte and a slot.

    The dispatcher writes it (``set_values`` for a chunk of plain successes, item
    assignment for a record to decode later); ``BatchResult`` reads it.
    """

    __slots__ = ("status", "values", "errors", "raw")

    def __init__(self, n: int) -> None:
        self.status = bytearray(n)
        self.values: list[Any] = [None] * n
        self.errors: dict[int, ErrorObject | None] = {}
        self.raw: dict[int, Any] = {}

    @classmethod
    def of(cls, records: dict[int, Any], n: int) -> ItemColumns:
        """Columns holding ``records`` (``{index: record or BatchItem}``) undecoded."""
        cols = cls(max(n, max(records, default=-1) + 1))
        cols.update(records.items())
        return cols

    def __len__(self) -> int:
        """Items with an outcome or a record (what a dict of records would count)."""
        return len(self.status) - self.status.count(ABSENT)

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and 0 <= index < len(self.status) and self.status[index] != ABSENT

    def __setitem__(self, index: int, record: Any) -> None:
        """A record to decode when the result is built (an already decoded ``BatchItem`` is unpacked)."""
        if record.__class__.__name__ == "BatchItem":
            self.set_item(index, record.status, record.result, record.error)
            return
        self.status[index] = RAW
        self.values[index] = None
        self.errors.pop(index, None)
        self.raw[index] = record

    def update(self, pairs: Iterable[tuple[int, Any]]) -> None:
        for index, record in pairs:
            self[index] = record

    def add_records(self, records: dict[int, Any]) -> None:
        """Records to decode later, ``{index: record}`` (a resume's finished items): one C-level pass."""
        status = self.status
        if not records:
            return
        # (records read back from a store or a worker: OpRecords or bytes, never a decoded BatchItem)
        if self.raw or self.errors or status.count(ABSENT) != len(status) or min(records) < 0:
            self.update(records.items())
            return
        fill_at(status, records, RAW)  # an index past the end raises IndexError, as item assignment does
        self.raw.update(records)

    def set_item(self, index: int, status: BatchItemStatus, result: Any = None,
                 error: ErrorObject | None = None) -> None:
        """One decoded outcome."""
        code = _STATUS_OF[status]
        self.raw.pop(index, None)
        self.status[index] = code
        self.values[index] = result if code == SUCCEEDED else None
        if code == FAILED:
            self.errors[index] = error
        else:
            self.errors.pop(index, None)

    def set_value(self, index: int, value: Any) -> None:
        """Item ``index`` succeeded with ``value``."""
        if self.status[index] == RAW:
            del self.raw[index]
        self.status[index] = SUCCEEDED
        self.values[index] = value

    def set_values(self, indices: list[int], values: list[Any]) -> None:
        """Items ``indices`` succeeded with ``values`` (the map hot path: a chunk of successes in one call)."""
        if len(indices) != len(values):
            raise ValueError(f"{len(indices)} indices for {len(values)} values")
        if not indices:
            return
        status = self.status
        raw, errors = self.raw, self.errors
        if (raw and not raw.keys().isdisjoint(indices)) or (errors and not errors.keys().isdisjoint(indices)):
            for index, value in zip(indices, values, strict=True):
                self.set_value(index, value)
                self.errors.pop(index, None)
            return
        first = run_start(indices)
        if first is not None and first + len(indices) <= len(status):
            end = first + len(indices)
            self.values[first:end] = values  # a contiguous chunk (the usual case): two slice copies
            status[first:end] = _ONE * len(indices)
            return
        column = self.values
        for index, value in zip(indices, values, strict=True):
            column[index] = value
            status[index] = SUCCEEDED

    def get(self, index: int, default: Any = None) -> Any:
        """The undecoded record of ``index``, if it has one."""
        return self.raw.get(index, default)

    def pending_raw(self) -> Iterator[tuple[int, Any]]:
        """``(index, record)`` of the records still to decode, in index order."""
        return iter(sorted(self.raw.items()))

    # -- reading (BatchResult) ------------------------------------------------------------
    def count(self, code: int) -> int:
        return self.status.count(code)

    def present(self) -> list[int]:
        """Indices of the items with an outcome, in order."""
        status = self.status
        if ABSENT not in status:
            return list(range(len(status)))
        return positions(status, _PRESENT)

    def results(self) -> list[Any]:
        """The values of the succeeded items, in index order (a new list)."""
        status = self.status
        if status.count(SUCCEEDED) == len(status):
            return self.values[:]
        return list(compress(self.values, status.translate(SUCCEEDED_MASK)))

    def indices_of(self, code: int) -> list[int]:
        return positions(self.status, _MASKS[code])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ItemColumns):
            return NotImplemented
        return (self.status == other.status and self.values == other.values and self.errors == other.errors
                and self.raw == other.raw)

    __hash__ = None  # type: ignore[assignment]

    def __getstate__(self) -> tuple[Any, ...]:
        return self.status, self.values, self.errors, self.raw

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.status, self.values, self.errors, self.raw = state


_MASKS = {code: mask(code) for code in (SUCCEEDED, FAILED, STARTED, RAW)}
_PRESENT = bytes(0 if b == ABSENT else 1 for b in range(256))
_SUCCEEDED_STATE = int(ItemState.SUCCEEDED)
_FROM_TABLE = bytes(SUCCEEDED if b == ItemState.SUCCEEDED else ABSENT for b in range(256))  # item state -> status


class RunningColumns:
    """The outcomes of a batch the dispatcher is running: values and undecoded records, no status byte.

    An item's value is kept as it succeeds (its SUCCEEDED is the item table's); a record to
    decode later (a failure, a still running branch, a resume's finished item, a value not
    decodable here) replaces it.  ``seal`` hands the ``ItemColumns`` of the ended batch over.
    """

    __slots__ = ("values", "raw", "_table")

    def __init__(self, table: ItemTable) -> None:
        self._table = table
        self.values: list[Any] = [None] * len(table)
        self.raw: dict[int, Any] = {}

    def __contains__(self, index: object) -> bool:
        """``index`` has an outcome or a record (as for ``ItemColumns``)."""
        return isinstance(index, int) and 0 <= index < len(self.values) and (
            index in self.raw or self._table.states[index] == _SUCCEEDED_STATE)

    def __len__(self) -> int:
        """How many items have an outcome or a record (``in``)."""
        states = self._table.states
        return self._table.count(ItemState.SUCCEEDED) + sum(states[i] != _SUCCEEDED_STATE for i in self.raw)

    def __setitem__(self, index: int, record: Any) -> None:
        """A record to decode when the result is built."""
        self.values[index] = None
        self.raw[index] = record

    def update(self, pairs: Iterable[tuple[int, Any]]) -> None:
        for index, record in pairs:
            self[index] = record

    def add_records(self, records: dict[int, Any]) -> None:
        """The records of a resume's finished items, ``{index: record}``, when the batch starts."""
        if records and (min(records) < 0 or max(records) >= len(self.values)):
            raise IndexError(f"item records {min(records)}..{max(records)} for {len(self.values)} items")
        self.raw.update(records)

    def set_item(self, index: int, status: BatchItemStatus, result: Any = None,
                 error: ErrorObject | None = None) -> None:
        """A decoded success (failures and unfinished items stay records until the result is built)."""
        if status is not BatchItemStatus.SUCCEEDED:
            raise ValueError(f"a running batch keeps a {status.value} item as its record")
        self.set_value(index, result)

    def set_value(self, index: int, value: Any) -> None:
        """Item ``index`` succeeded with ``value``."""
        if self.raw:
            self.raw.pop(index, None)
        self.values[index] = value

    def set_values(self, indices: list[int], values: list[Any]) -> None:
        """Items ``indices`` succeeded with ``values`` (the map hot path: a chunk of successes in one call)."""
        if len(indices) != len(values):
            raise ValueError(f"{len(indices)} indices for {len(values)} values")
        if not indices:
            return
        if self.raw and not self.raw.keys().isdisjoint(indices):
            for index, value in zip(indices, values, strict=True):
                self.set_value(index, value)
            return
        first = run_start(indices)
        column = self.values
        if first is not None and first + len(indices) <= len(column):
            column[first:first + len(indices)] = values  # a contiguous chunk (the usual case): one slice copy
            return
        for index, value in zip(indices, values, strict=True):
            column[index] = value

    def seal(self) -> ItemColumns:
        """The ended batch's ``ItemColumns`` (sharing these lists): a record is RAW, a SUCCEEDED item
        of the table with its value SUCCEEDED, any other item absent.  Nothing is written here after."""
        status = bytearray(self._table.states.translate(_FROM_TABLE))
        fill_at(status, self.raw, RAW)
        cols = ItemColumns.__new__(ItemColumns)
        cols.__setstate__((status, self.values, {}, self.raw))
        return cols
