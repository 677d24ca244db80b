"""The completion tracker of one batch: the counts its ``CompletionRule`` decides from.

The scheduler (the dispatcher, a worker's threads, Dask) moves the batch's items in its
one state table (``concurrency.item_table.ItemTable``, ``CompletionPolicy.items``) and
asks one question: stop now, and why?  The answer is the frozen
``concurrency.rule.CompletionRule`` applied to the table's counts; this class keeps no
per-item state of its own.  It latches the first decision and runs a ``should_complete``
predicate at most once per change the predicate could see.  A scheduler without branch
states (a worker's threads, ``BatchResult.from_items``, replay) reports events instead
(``on_started``, ``on_finished``, ...), each a guarded move in the same table.  It is cheap
(O(1) per event without a predicate).
"""

from __future__ import annotations

from collections.abc import Sequence

from durable_mp.concurrency.item_table import STARTED, TRACKER_STATUS, WAITING, IllegalTransition, ItemState, ItemTable
from durable_mp.concurrency.rule import CompletionRule
from durable_mp.config import CompletionConfig
from durable_mp.core.completion import (
    CompletionDecision,
    CompletionItemStatus,
    CompletionReason,
    CompletionStatus,
)
from durable_mp.core.runs import run_start, states_of
from durable_mp.exceptions import InvalidStateError, ValidationError

_S = ItemState
_UNFINISHED = frozenset({_S.PENDING, _S.REQUEUED, _S.DISPATCHED, _S.RUNNING})  # states an outcome may end
_STARTED = frozenset(STARTED)
_OK, _FAILED = int(_S.SUCCEEDED), int(_S.FAILED)  # plain ints: the counts are read on every decision


class CompletionPolicy:
    """Completion state of one batch of ``total`` items; owned by its scheduler.

    ``decision()`` returns None while scheduling should go on, else the reason to stop.
    A decision, once made, is latched: later events (branches that finish after the
    batch completed) update the counts but never the reason.
    """

    __slots__ = ("rule", "items", "_predicate", "_names", "_decided", "_last_custom", "_seen_changes")

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
        self.items = ItemTable(total)  # the batch's one per-item table; its scheduler moves the items
        self._last_custom: CompletionDecision | None = None
        self._seen_changes = -1  # ``items.changes`` when the predicate last ran
        # Nothing to run is complete before anything starts.
        self._decided: CompletionReason | None = CompletionReason.ALL_COMPLETED if total == 0 else None

    @property
    def total(self) -> int:
        return self.rule.total

    @property
    def succeeded_count(self) -> int:
        return self.items.counts[_OK]

    @property
    def failed_count(self) -> int:
        return self.items.counts[_FAILED]

    @property
    def started_count(self) -> int:
        """Items started and not finished yet."""
        return self.items.started_count()

    @property
    def completed_count(self) -> int:
        counts = self.items.counts
        return counts[_OK] + counts[_FAILED]

    @property
    def is_decided(self) -> bool:
        return self._decided is not None

    @property
    def _states(self) -> bytearray:
        """The item table's bytes (what a bulk and a one-by-one event must leave alike)."""
        return self.items.states

    # -- events of a scheduler without branch states --------------------------------------------
    def on_started(self, index: int) -> None:
        """Item ``index`` was dispatched; dispatching it again (after a crash) is fine."""
        state = self.items.states[self._checked(index)]
        if state in WAITING:
            self.items.move(index, _S.DISPATCHED)
        elif state not in _STARTED:
            raise InvalidStateError(f"item {index} cannot start: it already finished")

    def on_replayed(self, outcomes: dict[int, bool]) -> None:
        """Items that finished in an earlier run (resume), ``{index: succeeded}``: one pass.

        The same as ``on_started`` + ``on_finished`` for each, without a call per item.
        """
        if outcomes and (min(outcomes) < 0 or max(outcomes) >= self.rule.total):
            index = next(i for i in outcomes if not 0 <= i < self.rule.total)
            raise InvalidStateError(f"item index {index} out of range for {self.rule.total} items")
        try:
            self.items.replayed_many(outcomes)
        except IllegalTransition:
            index = next(i for i in outcomes if self.items.states[i] != _S.PENDING)
            raise InvalidStateError(f"item {index} finished twice") from None

    def on_started_many(self, indices: list[int]) -> None:
        """``on_started`` for a chunk of items."""
        sources = self._bulk_sources(indices)
        if sources is None or not WAITING.issuperset(sources):
            for index in indices:  # the one-at-a-time path says which item is wrong
                self.on_started(index)
            return
        self.items.move_many(indices, _S.DISPATCHED)

    def _bulk_sources(self, indices: list[int]) -> bytes | None:
        """The states of ``indices``, if a bulk update may read them at once (distinct, in range)."""
        if not indices or len(set(indices)) != len(indices) or min(indices) < 0 or max(indices) >= self.rule.total:
            return None
        return states_of(self.items.states, indices, run_start(indices))

    def on_succeeded_many(self, indices: list[int]) -> None:
        """``on_finished(index, True)`` for several items."""
        sources = self._bulk_sources(indices)
        if sources is None or not _UNFINISHED.issuperset(sources):
            for index in indices:  # the one-at-a-time path says which item is wrong
                self.on_finished(index, True)
            return
        items = self.items
        if _S.PENDING in sources or _S.REQUEUED in sources:  # outcomes of items never dispatched
            items.move_many([i for i, s in zip(indices, sources, strict=True) if s in WAITING], _S.DISPATCHED)
        items.finish_many(indices, _S.SUCCEEDED)

    def on_unstarted(self, index: int) -> None:
        """Item ``index`` was dispatched but never started: it is pending again."""
        state = self.items.states[self._checked(index)]
        if state != _S.DISPATCHED:
            raise InvalidStateError(f"item {index} cannot be returned unstarted: it is not started")
        self.items.move(index, _S.PENDING)

    def on_finished(self, index: int, succeeded: bool) -> None:
        """Item ``index`` reached a terminal state (it need not have been started)."""
        state = self.items.states[self._checked(index)]
        if state not in _UNFINISHED:
            raise InvalidStateError(f"item {index} finished twice")
        if state in WAITING:
            self.items.move(index, _S.DISPATCHED)
        self.items.finish(index, _S.SUCCEEDED if succeeded else _S.FAILED)

    # -- questions ------------------------------------------------------------------------------
    def decision(self) -> CompletionReason | None:
        """None to keep scheduling; otherwise stop now, for this reason."""
        if self._decided is None:
            custom = self._custom_decision() if self._predicate is not None else None
            counts = self.items.counts
            self._decided = self.rule.reason(counts[_OK], counts[_FAILED], custom)
        return self._decided

    def stop_distance(self) -> tuple[int | None, int | None]:
        """(more failures, more successes) that would complete the batch (``CompletionRule.stop_distance``)."""
        if self._decided is not None:
            return 0, 0
        counts = self.items.counts
        return self.rule.stop_distance(counts[_OK], counts[_FAILED])

    def tolerance_exceeded(self) -> bool:
        """True when failures so far are more than the config tolerates."""
        return self.rule.tolerance_exceeded(self.items.counts[_FAILED])

    def completion_status(self) -> CompletionStatus:
        """The snapshot a ``should_complete`` predicate sees (items in index order)."""
        names = self._names
        items = tuple(
            CompletionItemStatus(index=i, name=names[i] if names is not None else None, status=TRACKER_STATUS[s])
            for i, s in enumerate(self.items.states)
        )
        ok, failed = self.succeeded_count, self.failed_count
        return CompletionStatus(ok, failed, ok + failed, self.rule.total, items)

    def _custom_decision(self) -> CompletionDecision:
        # User code runs at most once per state change.
        changes = self.items.changes
        if changes != self._seen_changes or self._last_custom is None:
            result = self._predicate(self.completion_status())  # type: ignore[misc]
            if not isinstance(result, CompletionDecision):
                raise ValidationError(
                    "should_complete must return a CompletionDecision (use complete_batch() or "
                    f"continue_batch()), got: {result!r}"
                )
            self._last_custom, self._seen_changes = result, changes
        return self._last_custom

    def _checked(self, index: int) -> int:
        if not 0 <= index < self.rule.total:
            raise InvalidStateError(f"item index {index} out of range for {self.rule.total} items")
        return index
