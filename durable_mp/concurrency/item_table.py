"""The one per-item state table of a batch: a guarded state machine, one byte per item.

An item (one parallel function or map item) moves

    PENDING ──dispatch──▶ DISPATCHED ──▶ RUNNING ──▶ SUCCEEDED | FAILED | ABANDONED
       ▲                   │    │           │
       └─ returned unstarted┘   ▼           ▼
                          REQUEUED ◀── its worker died (it may have started)
                              └──dispatch again──▶ DISPATCHED

Any other move raises ``IllegalTransition``: a bug in a scheduler shows up as an error at
the spot, not as a lost or doubled result later.  REQUEUED is "pending, but it may have
started": it waits in the queue like PENDING, yet the completion tracker still counts it
as started, and it is re-dispatched with its checkpoints.

Every reader takes its view of this one table: the dispatcher the branch states, the
completion tracker (``concurrency.policy``) its counts (kept here, per state, by the
transitions) and the statuses a ``should_complete`` predicate sees (``TRACKER_STATUS``).
A million-item map costs a megabyte and a transition is a few byte operations.
"""

from __future__ import annotations

from enum import IntEnum

from durable_mp.core.bytemaps import mask, positions
from durable_mp.core.completion import BatchItemStatus
from durable_mp.core.runs import run_start, set_states, states_of


class IllegalTransition(RuntimeError):
    """The engine tried a move its state machine forbids (an internal error)."""


class ItemState(IntEnum):
    PENDING = 0
    DISPATCHED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    ABANDONED = 5  # still running when its batch completed: recorded STARTED
    REQUEUED = 6  # back in the queue after its worker died: it may have started


_S = ItemState
ITEM_MOVES: dict[ItemState, frozenset[ItemState]] = {
    _S.PENDING: frozenset({_S.DISPATCHED, _S.FAILED}),  # FAILED: unpicklable, never sent
    _S.DISPATCHED: frozenset({_S.RUNNING, _S.PENDING, _S.REQUEUED}),
    _S.RUNNING: frozenset({_S.SUCCEEDED, _S.FAILED, _S.ABANDONED, _S.REQUEUED}),
    _S.REQUEUED: frozenset({_S.DISPATCHED, _S.FAILED}),  # FAILED: it crashed its worker once too often
    _S.SUCCEEDED: frozenset(),
    _S.FAILED: frozenset(),
    _S.ABANDONED: frozenset(),
}
TERMINAL = frozenset({_S.SUCCEEDED, _S.FAILED, _S.ABANDONED})
WAITING = frozenset({_S.PENDING, _S.REQUEUED})  # in the queue (or to be), not on a worker
# What the completion tracker counts as started: dispatched and not finished, whatever became of it since.
STARTED = (_S.DISPATCHED, _S.RUNNING, _S.REQUEUED, _S.ABANDONED)
# The status a ``should_complete`` predicate sees for each state (None: not started).
TRACKER_STATUS: tuple[BatchItemStatus | None, ...] = tuple(
    BatchItemStatus.SUCCEEDED if s is _S.SUCCEEDED else BatchItemStatus.FAILED if s is _S.FAILED
    else BatchItemStatus.STARTED if s in STARTED else None
    for s in ItemState
)
_PENDING_MASK = mask(_S.PENDING)
_LEGAL = [[False] * len(ItemState) for _ in ItemState]
for _src, _dsts in ITEM_MOVES.items():
    for _dst in _dsts:
        _LEGAL[_src][_dst] = True
# A move the tracker's view sees (another status for a predicate): only those make its predicate run again.
_SEEN = [[TRACKER_STATUS[a] is not TRACKER_STATUS[b] for b in ItemState] for a in ItemState]


class ItemTable:
    """The states of every item of one batch; its scheduler is the only writer.

    ``counts[state]`` is kept by every transition, so a count is a list read; ``changes``
    grows with every move a ``should_complete`` predicate would see.
    """

    __slots__ = ("_states", "counts", "changes")

    def __init__(self, total: int) -> None:
        self._states = bytearray(total)
        self.counts = [0] * len(ItemState)
        self.counts[_S.PENDING] = total
        self.changes = 0

    def __len__(self) -> int:
        return len(self._states)

    @property
    def states(self) -> bytearray:
        """The raw state bytes, read-only by convention (bulk readers translate them)."""
        return self._states

    def state(self, index: int) -> ItemState:
        return ItemState(self._states[index])

    def move(self, index: int, to: ItemState) -> None:
        src = self._states[index]
        self._set(index, src, src, to)

    def finish(self, index: int, to: ItemState) -> None:
        """A reported outcome: a DISPATCHED branch necessarily ran first (one move on the hot path)."""
        src = self._states[index]
        self._set(index, src, _S.RUNNING if src == _S.DISPATCHED else src, to)

    def _set(self, index: int, src: int, via: int, to: ItemState) -> None:
        """Move ``index`` from ``src`` to ``to`` if ``via -> to`` is legal (``via``: ``src``, or where it passed)."""
        if not _LEGAL[via][to]:
            raise IllegalTransition(f"branch {index}: {ItemState(src).name} -> {to.name}")
        self._states[index] = to
        self.counts[src] -= 1
        self.counts[to] += 1
        if _SEEN[src][to]:
            self.changes += 1

    def move_many(self, indices: list[int], to: ItemState) -> None:
        """``move`` for a chunk (one call on the dispatch hot path)."""
        self._move_all(indices, to, finish=False)

    def finish_many(self, indices: list[int], to: ItemState) -> None:
        """``finish`` for several reported outcomes."""
        self._move_all(indices, to, finish=True)

    def _move_all(self, indices: list[int], to: ItemState, *, finish: bool) -> None:
        """Check and apply one move for many branches, counting sources per state, not per branch.

        Repeated indices take the one-at-a-time path, where the second move of a branch is
        checked against the first (and raises); otherwise nothing moves unless all may.
        """
        if len(set(indices)) != len(indices):
            for index in indices:
                self.finish(index, to) if finish else self.move(index, to)
            return
        states, counts = self._states, self.counts
        first = run_start(indices)  # once: both the read and the write use it
        sources = states_of(states, indices, first)
        present = set(sources)
        for src in present:
            via = _S.RUNNING if finish and src == _S.DISPATCHED else src
            if not _LEGAL[via][to]:
                index = indices[sources.index(src)]
                raise IllegalTransition(f"branch {index}: {ItemState(src).name} -> {to.name}")
        seen = False
        for src in present:
            counts[src] -= sources.count(src)
            seen = seen or _SEEN[src][to]
        set_states(states, indices, to, first)
        counts[to] += len(indices)
        if seen:
            self.changes += 1

    def replayed_many(self, outcomes: dict[int, bool]) -> None:
        """``replayed`` for every branch a resume found finished: ``{index: succeeded}``, one pass.

        Every index must be PENDING (checked before anything moves).
        """
        if not outcomes:
            return
        states, counts = self._states, self.counts
        sources = bytes(map(states.__getitem__, outcomes))
        if sources.count(_S.PENDING) != len(sources):
            index = next(i for i, s in zip(outcomes, sources, strict=True) if s != _S.PENDING)
            raise IllegalTransition(f"branch {index}: {ItemState(states[index]).name} -> replayed")
        done, failed = int(_S.SUCCEEDED), int(_S.FAILED)  # plain ints: no enum per item
        ok = 0
        for index, succeeded in outcomes.items():
            if succeeded:
                states[index] = done
                ok += 1
            else:
                states[index] = failed
        counts[_S.PENDING] -= len(outcomes)
        counts[_S.SUCCEEDED] += ok
        counts[_S.FAILED] += len(outcomes) - ok
        self.changes += 1

    def replayed(self, index: int, succeeded: bool) -> None:
        """A branch finished in an earlier run (resume): terminal without running."""
        self.move(index, _S.DISPATCHED)
        self.finish(index, _S.SUCCEEDED if succeeded else _S.FAILED)

    def pending(self) -> list[int]:
        """The indices of the branches still PENDING, in order (a resume's queue)."""
        if self.counts[_S.PENDING] == len(self._states):
            return list(range(len(self._states)))
        return positions(self._states, _PENDING_MASK)

    def count(self, state: ItemState) -> int:
        return self.counts[state]

    def started_count(self) -> int:
        """Items dispatched and not finished (the tracker's "started"), also those back in the queue."""
        counts = self.counts
        return counts[_S.DISPATCHED] + counts[_S.RUNNING] + counts[_S.REQUEUED] + counts[_S.ABANDONED]

    def all_ended(self) -> bool:
        """Every branch reached an end (none pending, dispatched, running or requeued)."""
        return sum(self.counts[s] for s in TERMINAL) == len(self._states)
