"""Results of ``parallel``/``map`` and the one place that decides when a batch is done.

``CompletionPolicy`` is fed events (an item started, an item finished) by the scheduler
and answers one question: stop now, and why?  It is pure and cheap (O(1) per event
without a ``should_complete`` predicate), so it also serves replay and
``BatchResult.from_items``.  Rules, as in the reference SDK:

* tolerance is exceeded when ``failed > tolerated_failure_count`` or
  ``failed / total * 100 > tolerated_failure_percentage``; with no criteria at all a
  single failure exceeds it (fail-fast); with a predicate it never is;
* the batch is complete when the predicate says so, when every item finished, or when
  ``min_successful`` successes are in;
* reason precedence: FAILURE_TOLERANCE_EXCEEDED, CUSTOM_COMPLETION_*, ALL_COMPLETED,
  MIN_SUCCESSFUL_REACHED.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Generic, TypeVar

from durable_mp.concurrency.columns import AS_ITEM_STATUS, ItemColumns
from durable_mp.concurrency.columns import FAILED as COL_FAILED
from durable_mp.concurrency.columns import STARTED as COL_STARTED
from durable_mp.concurrency.columns import SUCCEEDED as COL_SUCCEEDED
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
from durable_mp.core.runs import run_start, set_states, states_of
from durable_mp.exceptions import BatchCompletionError, ChildContextError, InvalidStateError, ValidationError
from durable_mp.lambda_service import ErrorObject

__all__ = [
    "BatchCompletionError", "BatchItem", "BatchItemStatus", "BatchResult", "CompletionDecision", "ItemColumns",
    "CompletionItemStatus", "CompletionOutcome", "CompletionPolicy", "CompletionReason",
    "CompletionStatus", "complete_batch", "continue_batch",
]

logger = logging.getLogger(__name__)

R = TypeVar("R")

# Per-item state in CompletionPolicy, one byte each.
_PENDING, _STARTED, _SUCCEEDED, _FAILED = 0, 1, 2, 3
_ONLY_UNFINISHED = frozenset({_PENDING, _STARTED})  # states a bulk start or success may move from
_AS_ITEM_STATUS = (None, BatchItemStatus.STARTED, BatchItemStatus.SUCCEEDED, BatchItemStatus.FAILED)
_FROM_ITEM_STATUS = {status: code for code, status in enumerate(_AS_ITEM_STATUS)}


def _percentage_limit(pct: float, total: int) -> int:
    """The fewest failures ``tolerance_exceeded`` calls over ``pct`` percent of ``total``.

    That test is the reference's float comparison ``failed / total * 100 > pct``; the
    real-number answer ``int(pct * total / 100) + 1`` is one too many where the float
    product rounds up past an integer (20 items at 55 %: 11 failures exceed it), which
    let a worker start one item after the batch was decided.  Start from it and step to
    the comparison's own boundary (at most a step or two).
    """
    limit = int(pct * total / 100) + 1
    while limit > 0 and (limit - 1) / total * 100 > pct:
        limit -= 1
    while limit <= total and not limit / total * 100 > pct:
        limit += 1
    return limit


class CompletionPolicy:
    """Completion state of one batch of ``total`` items; owned by its scheduler.

    ``decision()`` returns None while scheduling should go on, else the reason to stop.
    A decision, once made, is latched: later events (branches that finish after the
    batch completed) update the counts but never the reason.
    """

    __slots__ = (
        "_total", "_min_successful", "_max_failures", "_max_failure_pct", "_fail_fast",
        "_predicate", "_names", "_states", "_succeeded", "_failed", "_started",
        "_decided", "_last_custom", "_dirty",
    )

    def __init__(
        self,
        config: CompletionConfig | None,
        total: int,
        *,
        names: Sequence[str | None] | None = None,
        validate_total: bool = True,
    ) -> None:
        config = config if config is not None else CompletionConfig()
        if total < 0:
            raise ValidationError(f"total must be non-negative, got: {total}")
        if validate_total and config.min_successful is not None and config.min_successful > total:
            raise ValidationError(
                f"min_successful cannot be greater than total items: {config.min_successful} > {total}"
            )
        if names is not None and len(names) != total:
            raise ValidationError(f"names has {len(names)} entries for {total} items")
        self._total = total
        self._min_successful = config.min_successful
        self._max_failures = config.tolerated_failure_count
        self._max_failure_pct = config.tolerated_failure_percentage
        self._predicate = config.should_complete
        self._fail_fast = self._predicate is None and not config.has_thresholds
        self._names = names
        self._states = bytearray(total)
        self._succeeded = self._failed = self._started = 0
        self._last_custom: CompletionDecision | None = None
        self._dirty = True
        # Nothing to run is complete before anything starts.
        self._decided: CompletionReason | None = CompletionReason.ALL_COMPLETED if total == 0 else None

    @property
    def total(self) -> int:
        return self._total

    @property
    def succeeded_count(self) -> int:
        return self._succeeded

    @property
    def failed_count(self) -> int:
        return self._failed

    @property
    def started_count(self) -> int:
        """Items started and not finished yet."""
        return self._started

    @property
    def completed_count(self) -> int:
        return self._succeeded + self._failed

    @property
    def is_decided(self) -> bool:
        return self._decided is not None

    def on_started(self, index: int) -> None:
        """Item ``index`` was dispatched; dispatching it again (after a crash) is fine."""
        state = self._states[self._checked(index)]
        if state == _PENDING:
            self._states[index] = _STARTED
            self._started += 1
            self._dirty = True
        elif state != _STARTED:
            raise InvalidStateError(f"item {index} cannot start: it already finished")

    def on_replayed(self, outcomes: dict[int, bool]) -> None:
        """Items that finished in an earlier run (resume), ``{index: succeeded}``: one pass.

        The same as ``on_started`` + ``on_finished`` for each, without a call per item.
        """
        states, total = self._states, self._total
        ok = 0
        for index, succeeded in outcomes.items():
            if not 0 <= index < total:
                raise InvalidStateError(f"item index {index} out of range for {total} items")
            if states[index] != _PENDING:
                raise InvalidStateError(f"item {index} finished twice")
            if succeeded:
                states[index] = _SUCCEEDED
                ok += 1
            else:
                states[index] = _FAILED
        self._succeeded += ok
        self._failed += len(outcomes) - ok
        self._dirty = True

    def on_started_many(self, indices: list[int]) -> None:
        """``on_started`` for a chunk of items (one call on the dispatch hot path)."""
        bulk = self._bulk_sources(indices)
        if bulk is None or not _ONLY_UNFINISHED.issuperset(bulk[0]):
            for index in indices:  # the one-at-a-time path says which item is wrong
                self.on_started(index)
            return
        self._started += bulk[0].count(_PENDING)
        set_states(self._states, indices, _STARTED, bulk[1])
        self._dirty = True

    def _bulk_sources(self, indices: list[int]) -> tuple[bytes, int | None] | None:
        """The states of ``indices`` and their ``run_start``, if a bulk update may read them at once
        (distinct, in range)."""
        if not indices or len(set(indices)) != len(indices) or min(indices) < 0 or max(indices) >= self._total:
            return None
        first = run_start(indices)
        return states_of(self._states, indices, first), first

    def on_succeeded_many(self, indices: list[int]) -> None:
        """``on_finished(index, True)`` for several items (the hot path of a map)."""
        bulk = self._bulk_sources(indices)
        if bulk is None or not _ONLY_UNFINISHED.issuperset(bulk[0]):
            for index in indices:  # the one-at-a-time path says which item is wrong
                self.on_finished(index, True)
            return
        self._started -= bulk[0].count(_STARTED)
        set_states(self._states, indices, _SUCCEEDED, bulk[1])
        self._succeeded += len(indices)
        self._dirty = True

    def on_unstarted(self, index: int) -> None:
        """Item ``index`` was dispatched but its worker never started it: it is pending again."""
        state = self._states[self._checked(index)]
        if state != _STARTED:
            raise InvalidStateError(f"item {index} cannot be returned unstarted: it is not started")
        self._states[index] = _PENDING
        self._started -= 1
        self._dirty = True

    def stop_distance(self) -> tuple[int | None, int | None]:
        """(more failures, more successes) that would complete the batch; None = no number would.

        A ``should_complete`` predicate may decide on any outcome: (1, 1).  Reaching
        ALL_COMPLETED is not counted: it needs every item, so no item is started after it.
        """
        if self._decided is not None:
            return 0, 0
        if self._predicate is not None:
            return 1, 1
        failures: int | None = None
        if self._fail_fast:
            failures = 1
        else:
            limits = []
            if self._max_failures is not None:
                limits.append(self._max_failures + 1)
            if self._max_failure_pct is not None and self._total > 0:
                limits.append(_percentage_limit(self._max_failure_pct, self._total))
            if limits:
                failures = max(1, min(limits) - self._failed)
                if failures + self._failed > self._total:
                    failures = None
        successes = None
        if self._min_successful is not None:
            successes = max(1, self._min_successful - self._succeeded)
        return failures, successes

    def on_finished(self, index: int, succeeded: bool) -> None:
        """Item ``index`` reached a terminal state (it need not have been started)."""
        state = self._states[self._checked(index)]
        if state == _STARTED:
            self._started -= 1
        elif state != _PENDING:
            raise InvalidStateError(f"item {index} finished twice")
        if succeeded:
            self._states[index] = _SUCCEEDED
            self._succeeded += 1
        else:
            self._states[index] = _FAILED
            self._failed += 1
        self._dirty = True

    def decision(self) -> CompletionReason | None:
        """None to keep scheduling; otherwise stop now, for this reason."""
        if self._decided is None:
            self._decided = self._evaluate()
        return self._decided

    def tolerance_exceeded(self) -> bool:
        """True when failures so far are more than the config tolerates."""
        failed = self._failed
        if self._predicate is not None:
            return False
        if self._fail_fast:
            return failed > 0
        if self._max_failures is not None and failed > self._max_failures:
            return True
        if self._max_failure_pct is not None and self._total > 0:
            return failed / self._total * 100 > self._max_failure_pct
        return False

    def completion_status(self) -> CompletionStatus:
        """The snapshot a ``should_complete`` predicate sees (items in index order)."""
        names = self._names
        items = tuple(
            CompletionItemStatus(index=i, name=names[i] if names is not None else None, status=_AS_ITEM_STATUS[s])
            for i, s in enumerate(self._states)
        )
        done = self._succeeded + self._failed
        return CompletionStatus(self._succeeded, self._failed, done, self._total, items)

    def _evaluate(self) -> CompletionReason | None:
        if self.tolerance_exceeded():
            return CompletionReason.FAILURE_TOLERANCE_EXCEEDED
        if self._predicate is not None:
            custom = self._custom_decision()
            if custom.complete:
                if custom.outcome is CompletionOutcome.FAILED:
                    return CompletionReason.CUSTOM_COMPLETION_FAILED
                return CompletionReason.CUSTOM_COMPLETION_SUCCEEDED
        if self._succeeded + self._failed >= self._total:
            return CompletionReason.ALL_COMPLETED
        if self._min_successful is not None and self._succeeded >= self._min_successful:
            return CompletionReason.MIN_SUCCESSFUL_REACHED
        return None

    def _custom_decision(self) -> CompletionDecision:
        # User code runs at most once per state change.
        if self._dirty or self._last_custom is None:
            result = self._predicate(self.completion_status())  # type: ignore[misc]
            if not isinstance(result, CompletionDecision):
                raise ValidationError(
                    "should_complete must return a CompletionDecision (use complete_batch() or "
                    f"continue_batch()), got: {result!r}"
                )
            self._last_custom, self._dirty = result, False
        return self._last_custom

    def _checked(self, index: int) -> int:
        if not 0 <= index < self._total:
            raise InvalidStateError(f"item index {index} out of range for {self._total} items")
        return index


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
