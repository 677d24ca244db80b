"""Results of ``parallel``/``map``: ``BatchResult`` and ``BatchItem``, as users import them.

The completion logic lives apart: the frozen rule (``concurrency.rule.CompletionRule``,
pure predicates over counts) and the per-batch tracker that feeds it
(``concurrency.policy.CompletionPolicy``).  This module re-exports the names users
import from here, as the reference's ``concurrency/models.py`` holds them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Generic, TypeVar

from durable_mp.concurrency.columns import AS_ITEM_STATUS, ItemColumns
from durable_mp.concurrency.columns import FAILED as COL_FAILED
from durable_mp.concurrency.columns import STARTED as COL_STARTED
from durable_mp.concurrency.columns import SUCCEEDED as COL_SUCCEEDED
from durable_mp.concurrency.policy import CompletionPolicy
from durable_mp.concurrency.rule import CompletionRule
from durable_mp.config import CompletionConfig
from durable_mp.core.completion import (
    BatchItemStatus,
    CompletionDecision,
    CompletionItemStatus,
    CompletionOutcome,
    CompletionReason,
    CompletionStatus,
    complete_batch,
    continue_batch,
)
from durable_mp.exceptions import BatchCompletionError, ChildContextError, ValidationError
from durable_mp.lambda_service import ErrorObject

__all__ = [
    "BatchCompletionError", "BatchItem", "BatchItemStatus", "BatchResult", "CompletionDecision", "ItemColumns",
    "CompletionItemStatus", "CompletionOutcome", "CompletionPolicy", "CompletionReason",
    "CompletionRule", "CompletionStatus", "complete_batch", "continue_batch",
]

logger = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(frozen=True)
class BatchItem(Generic[R]):
    """One branch's outcome; ``index`` is its position in the input."""

    index: int
    status: BatchItemStatus
    result: R | None = None
    error: ErrorObject | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "status": self.status.value,
            "result": self.result,
            "error": self.error.to_dict() if self.error else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchItem[R]:
        error = data.get("error")
        return cls(
            index=data["index"],
            status=BatchItemStatus(data["status"]),
            result=data.get("result"),
            error=ErrorObject.from_dict(error) if error else None,
        )


def succeeded_item(index: int, result: Any) -> BatchItem:
    """``BatchItem(index, SUCCEEDED, result)`` without the frozen dataclass's ``__init__``.

    Building the BatchResult of a million-item map spends most of its time in
    ``object.__setattr__``; this sets the instance dict in one go (same object).
    """
    item = _new(BatchItem)
    _set(item, "__dict__", {"index": index, "status": _ITEM_SUCCEEDED, "result": result, "error": None})
    return item


_new = object.__new__
_set = object.__setattr__
_ITEM_SUCCEEDED = BatchItemStatus.SUCCEEDED


@dataclass(frozen=True)
class BatchResult(Generic[R]):
    """What ``parallel``/``map`` return: every reported item, always in input order.

    Items never started (early completion) are absent, so ``total_count`` may be less
    than the number of inputs; started-but-unfinished ones are ``STARTED``.

    The engine builds it on ``ItemColumns`` (``of_columns``): ``all`` and its
    ``BatchItem`` objects are made the first time ``all`` is read; counts, results and
    errors are read from the columns until then.  Once ``all`` exists it is the truth.
    """

    all: list[BatchItem[R]]
    completion_reason: CompletionReason

    def __post_init__(self) -> None:
        items = self.all if isinstance(self.all, list) else list(self.all)
        if any(items[i].index > items[i + 1].index for i in range(len(items) - 1)):
            items = sorted(items, key=lambda item: item.index)
        object.__setattr__(self, "all", items)
        if not isinstance(self.completion_reason, CompletionReason):
            object.__setattr__(self, "completion_reason", CompletionReason(self.completion_reason))

    @classmethod
    def of_columns(cls, columns: ItemColumns, completion_reason: CompletionReason) -> BatchResult[R]:
        """A result on decoded columns (no ``RAW`` entry), which it then owns."""
        if columns.raw:
            raise ValidationError(f"{len(columns.raw)} item records are not decoded")
        result = object.__new__(cls)
        object.__setattr__(result, "_columns", columns)
        object.__setattr__(result, "completion_reason", CompletionReason(completion_reason))
        return result

    def __getattr__(self, name: str) -> Any:
        # Only called when ``all`` is not set yet (a result on columns): build it once.
        if name == "all":
            columns = self.__dict__.get("_columns")
            if columns is not None:
                items = _items_of(columns)
                self.__dict__["all"] = items
                del self.__dict__["_columns"]  # ``all`` is the truth from now on (it may be mutated)
                return items
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, BatchResult)
        mine, theirs = self.__dict__.get("_columns"), other.__dict__.get("_columns")
        if mine is not None and theirs is not None:
            return mine == theirs and self.completion_reason == other.completion_reason
        return (self.all, self.completion_reason) == (other.all, other.completion_reason)

    def __hash__(self) -> int:
        return hash((self.all, self.completion_reason))  # TypeError, as the dataclass's: ``all`` is a list

    def _cols(self) -> ItemColumns | None:
        return self.__dict__.get("_columns")

    @classmethod
    def from_dict(cls, data: dict[str, Any], completion_config: CompletionConfig | None = None) -> BatchResult[R]:
        items: list[BatchItem[R]] = [BatchItem.from_dict(item) for item in data["all"]]
        reason = data.get("completionReason")
        if reason is None:
            result = cls.from_items(items, completion_config)
            logger.warning("BatchResult without completionReason; inferred %s", result.completion_reason.value)
            return result
        return cls(items, CompletionReason(reason))

    @classmethod
    def from_items(
        cls, items: Iterable[BatchItem[R]], completion_config: CompletionConfig | None = None
    ) -> BatchResult[R]:
        """Infer the reason from the items alone (exact only if none were omitted)."""
        items = list(items)
        policy = CompletionPolicy(completion_config, len(items), validate_total=False)
        for position, item in enumerate(items):
            if item.status is BatchItemStatus.STARTED:
                policy.on_started(position)
            else:
                policy.on_finished(position, item.status is BatchItemStatus.SUCCEEDED)
        return cls(items, policy.decision() or CompletionReason.ALL_COMPLETED)

    def to_dict(self) -> dict[str, Any]:
        columns = self._cols()
        items = self.all if columns is None else map(_item_at, repeat(columns), columns.present())
        return {"all": [item.to_dict() for item in items], "completionReason": self.completion_reason.value}

    def _with_status(self, status: BatchItemStatus) -> list[BatchItem[R]]:
        columns = self._cols()
        if columns is not None:
            return [_item_at(columns, index) for index in columns.indices_of(_COLUMN_OF[status])]
        return [item for item in self.all if item.status is status]

    def succeeded(self) -> list[BatchItem[R]]:
        return self._with_status(BatchItemStatus.SUCCEEDED)

    def failed(self) -> list[BatchItem[R]]:
        return self._with_status(BatchItemStatus.FAILED)

    def started(self) -> list[BatchItem[R]]:
        return self._with_status(BatchItemStatus.STARTED)

    def get_results(self) -> list[R]:
        """Results of the succeeded items, in input order (``None`` results included)."""
        columns = self._cols()
        if columns is not None:
            return columns.results()
        return [item.result for item in self.all if item.status is BatchItemStatus.SUCCEEDED]  # type: ignore[misc]

    def get_errors(self) -> list[ErrorObject | None]:
        """One entry per failed item, in input order."""
        columns = self._cols()
        if columns is not None:
            return [columns.errors.get(index) for index in columns.indices_of(COL_FAILED)]
        return [item.error for item in self.all if item.status is BatchItemStatus.FAILED]

    @property
    def successful_results(self) -> list[R]:
        """Same as ``get_results()``: documented upstream but never shipped there."""
        return self.get_results()

    @property
    def failed_results(self) -> list[BatchItem[R]]:
        """The failed items (with ``index`` and ``error``), in input order."""
        return self.failed()

    @property
    def status(self) -> BatchItemStatus:
        """A custom decision wins; otherwise FAILED iff any item failed, even if tolerated."""
        if self.completion_reason is CompletionReason.CUSTOM_COMPLETION_FAILED:
            return BatchItemStatus.FAILED
        if self.completion_reason is CompletionReason.CUSTOM_COMPLETION_SUCCEEDED:
            return BatchItemStatus.SUCCEEDED
        return BatchItemStatus.FAILED if self.has_failure else BatchItemStatus.SUCCEEDED

    def _count(self, status: BatchItemStatus) -> int:
        columns = self._cols()
        if columns is not None:
            return columns.count(_COLUMN_OF[status])
        return sum(1 for item in self.all if item.status is status)

    @property
    def has_failure(self) -> bool:
        return self._count(BatchItemStatus.FAILED) > 0

    @property
    def success_count(self) -> int:
        return self._count(BatchItemStatus.SUCCEEDED)

    @property
    def failure_count(self) -> int:
        return self._count(BatchItemStatus.FAILED)

    @property
    def started_count(self) -> int:
        return self._count(BatchItemStatus.STARTED)

    @property
    def total_count(self) -> int:
        columns = self._cols()
        return len(columns) if columns is not None else len(self.all)

    def _first_failed(self) -> BatchItem[R] | None:
        columns = self._cols()
        if columns is not None:
            index = columns.status.find(COL_FAILED)
            return None if index < 0 else _item_at(columns, index)
        return next((item for item in self.all if item.status is BatchItemStatus.FAILED), None)

    def throw_if_error(self) -> None:
        """Raise for the first failed item (lowest index), else for a custom failure.

        A failed item raises ``ChildContextError`` carrying its error's fields, from a
        ``DurableOperationError`` rebuilt from them; a batch a custom predicate declared
        failed with no failed item raises ``BatchCompletionError``.
        """
        first_failed = self._first_failed()
        if first_failed is not None:
            if first_failed.error is None:
                raise ChildContextError(message=f"Batch item {first_failed.index} failed without an ErrorObject.")
            first_failed.error.raise_as_operation_error(ChildContextError)
        if self.completion_reason is CompletionReason.CUSTOM_COMPLETION_FAILED:
            raise BatchCompletionError(self.completion_reason)


_COLUMN_OF = {BatchItemStatus.SUCCEEDED: COL_SUCCEEDED, BatchItemStatus.FAILED: COL_FAILED,
              BatchItemStatus.STARTED: COL_STARTED}


def _item_at(columns: ItemColumns, index: int) -> BatchItem:
    """The ``BatchItem`` of item ``index`` of decoded columns (built like ``succeeded_item``)."""
    item = _new(BatchItem)
    code = columns.status[index]
    _set(item, "__dict__", {"index": index, "status": AS_ITEM_STATUS[code],
                            "result": columns.values[index] if code == COL_SUCCEEDED else None,
                            "error": columns.errors.get(index) if code == COL_FAILED else None})
    return item


def _items_of(columns: ItemColumns) -> list[BatchItem]:
    status = columns.status
    if status.count(COL_SUCCEEDED) == len(status):
        return list(map(succeeded_item, range(len(status)), columns.values))
    return [_item_at(columns, index) for index in columns.present()]
