"""The completion tracker of one batch: the counts its ``CompletionRule`` decides from.

The scheduler (the dispatcher, a worker's threads, Dask) feeds it events (an item
started, finished, came back unstarted, was replayed) and asks one question: stop now,
and why?  The answer is the frozen ``concurrency.rule.CompletionRule`` applied to the
counts; this class only keeps them, latches the first decision, and runs a
``should_complete`` predicate at most once per change.  It keeps a byte per item too:
it refuses an item finishing twice, and a predicate sees every item's status.  It is
cheap (O(1) per event without a predicate), so it also serves replay and
``BatchResult.from_items``.
"""

from __future__ import annotations

from collections.abc import Sequence

from durable_mp.concurrency.rule import CompletionRule
from durable_mp.config import CompletionConfig
from durable_mp.core.completion import (
    BatchItemStatus,
    CompletionDecision,
    CompletionItemStatus,
    CompletionReason,
    CompletionStatus,
)
from durable_mp.core.runs import run_start, set_states, states_of
from durable_mp.exceptions import InvalidStateError, ValidationError

# Per-item state in CompletionPolicy, one byte each.
_PENDING, _STARTED, _SUCCEEDED, _FAILED = 0, 1, 2, 3
_ONLY_UNFINISHED = frozenset({_PENDING, _STARTED})  # states a bulk start or success may move from
_AS_ITEM_STATUS = (None, BatchItemStatus.STARTED, BatchItemStatus.SUCCEEDED, BatchItemStatus.FAILED)


class CompletionPolicy:
    """Completion state of one batch of ``total`` items; owned by its scheduler.

    ``decision()`` returns None while scheduling should go on, else the reason to stop.
    A decision, once made, is latched: later events (branches that finish after the
    batch completed) update the counts but never the reason.
    """

    __slots__ = (
        "rule", "_predicate", "_names", "_states", "_succeeded", "_failed", "_started",
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
        self.rule = CompletionRule.of(config, total, validate_total=validate_total)
        if names is not None and len(names) != total:
            raise ValidationError(f"names has {len(names)} entries for {total} items")
        self._predicate = config.should_complete if config is not None else None
        self._names = names
        self._states = bytearray(total)
        self._succeeded = self._failed = self._started = 0
        self._last_custom: CompletionDecision | None = None
        self._dirty = True
        # Nothing to run is complete before anything starts.
        self._decided: CompletionReason | None = CompletionReason.ALL_COMPLETED if total == 0 else None

    @property
    def total(self) -> int:
        return self.rule.total

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

    # -- events ---------------------------------------------------------------------------------
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
        states, total = self._states, self.rule.total
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
        if not indices or len(set(indices)) != len(indices) or min(indices) < 0 or max(indices) >= self.rule.total:
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

    # -- questions ------------------------------------------------------------------------------
    def decision(self) -> CompletionReason | None:
        """None to keep scheduling; otherwise stop now, for this reason."""
        if self._decided is None:
            custom = self._custom_decision() if self._predicate is not None else None
            self._decided = self.rule.reason(self._succeeded, self._failed, custom)
        return self._decided

    def stop_distance(self) -> tuple[int | None, int | None]:
        """(more failures, more successes) that would complete the batch (``CompletionRule.stop_distance``)."""
        if self._decided is not None:
            return 0, 0
        return self.rule.stop_distance(self._succeeded, self._failed)

    def tolerance_exceeded(self) -> bool:
        """True when failures so far are more than the config tolerates."""
        return self.rule.tolerance_exceeded(self._failed)

    def completion_status(self) -> CompletionStatus:
        """The snapshot a ``should_complete`` predicate sees (items in index order)."""
        names = self._names
        items = tuple(
            CompletionItemStatus(index=i, name=names[i] if names is not None else None, status=_AS_ITEM_STATUS[s])
            for i, s in enumerate(self._states)
        )
        done = self._succeeded + self._failed
        return CompletionStatus(self._succeeded, self._failed, done, self.rule.total, items)

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
        if not 0 <= index < self.rule.total:
            raise InvalidStateError(f"item index {index} out of range for {self.rule.total} items")
        return index
