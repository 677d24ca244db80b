"""The two state machines of the engine: a branch and a worker, with guarded transitions.

A branch (one parallel function or map item) moves

    PENDING ──dispatch──▶ DISPATCHED ──▶ RUNNING ──▶ SUCCEEDED | FAILED | ABANDONED
       ▲                      │             │
       └── returned unstarted ┘             └── its worker died: back to PENDING

and a worker moves STARTING ▶ IDLE ⇄ BUSY ▶ DRAINING ▶ DEAD (DEAD from anywhere).
Any other move raises ``IllegalTransition``: a bug in the scheduler shows up as an
error at the spot, not as a lost or doubled result later.

Branch states of a batch live in one ``bytearray`` (``BranchTable``): a million-item
map costs a megabyte and a transition is two byte operations.
"""

from __future__ import annotations

from enum import Enum, IntEnum

from durable_mp.core.bytemaps import mask, positions
from durable_mp.core.runs import run_start, set_states, states_of


class IllegalTransition(RuntimeError):
    """The engine tried a move its state machine forbids (an internal error)."""


class BranchState(IntEnum):
    PENDING = 0
    DISPATCHED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    ABANDONED = 5


_B = BranchState
BRANCH_MOVES: dict[BranchState, frozenset[BranchState]] = {
    _B.PENDING: frozenset({_B.DISPATCHED, _B.FAILED}),  # FAILED: unpicklable, never sent
    _B.DISPATCHED: frozenset({_B.RUNNING, _B.PENDING}),
    _B.RUNNING: frozenset({_B.SUCCEEDED, _B.FAILED, _B.ABANDONED, _B.PENDING}),
    _B.SUCCEEDED: frozenset(),
    _B.FAILED: frozenset(),
    _B.ABANDONED: frozenset(),
}
TERMINAL = frozenset({_B.SUCCEEDED, _B.FAILED, _B.ABANDONED})
_PENDING_MASK = mask(_B.PENDING)
_LEGAL = [[False] * len(BranchState) for _ in BranchState]
for _src, _dsts in BRANCH_MOVES.items():
    for _dst in _dsts:
        _LEGAL[_src][_dst] = True


class BranchTable:
    """The states of every branch of one batch; the dispatcher is its only writer."""

    __slots__ = ("_states", "counts")

    def __init__(self, total: int) -> None:
        self._states = bytearray(total)
        self.counts = [0] * len(BranchState)
        self.counts[_B.PENDING] = total

    def __len__(self) -> int:
        return len(self._states)

    def state(self, index: int) -> BranchState:
        return BranchState(self._states[index])

    def move(self, index: int, to: BranchState) -> None:
        src = self._states[index]
        if not _LEGAL[src][to]:
            raise IllegalTransition(f"branch {index}: {BranchState(src).name} -> {to.name}")
        self._states[index] = to
        self.counts[src] -= 1
        self.counts[to] += 1

    def finish(self, index: int, to: BranchState) -> None:
        """A reported outcome: a DISPATCHED branch necessarily ran first (one move on the hot path)."""
        src = self._states[index]
        via = _B.RUNNING if src == _B.DISPATCHED else src
        if not _LEGAL[via][to]:
            raise IllegalTransition(f"branch {index}: {BranchState(src).name} -> {to.name}")
        self._states[index] = to
        self.counts[src] -= 1
        self.counts[to] += 1

    def move_many(self, indices: list[int], to: BranchState) -> None:
        """``move`` for a chunk (one call on the dispatch hot path)."""
        self._move_all(indices, to, finish=False)

    def finish_many(self, indices: list[int], to: BranchState) -> None:
        """``finish`` for several reported outcomes."""
        self._move_all(indices, to, finish=True)

    def _move_all(self, indices: list[int], to: BranchState, *, finish: bool) -> None:
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
            via = _B.RUNNING if finish and src == _B.DISPATCHED else src
            if not _LEGAL[via][to]:
                index = indices[sources.index(src)]
                raise IllegalTransition(f"branch {index}: {BranchState(src).name} -> {to.name}")
        for src in present:
            counts[src] -= sources.count(src)
        set_states(states, indices, to, first)
        counts[to] += len(indices)

    def replayed_many(self, outcomes: dict[int, bool]) -> None:
        """``replayed`` for every branch a resume found finished: ``{index: succeeded}``, one pass."""
        states, counts = self._states, self.counts
        pending, done, failed = int(_B.PENDING), int(_B.SUCCEEDED), int(_B.FAILED)  # plain ints: no enum per item
        ok = 0
        for index, succeeded in outcomes.items():
            if states[index] != pending:
                raise IllegalTransition(f"branch {index}: {BranchState(states[index]).name} -> replayed")
            if succeeded:
                states[index] = done
                ok += 1
            else:
                states[index] = failed
        counts[_B.PENDING] -= len(outcomes)
        counts[_B.SUCCEEDED] += ok
        counts[_B.FAILED] += len(outcomes) - ok

    def pending(self) -> list[int]:
        """The indices of the branches still PENDING, in order (a resume's queue)."""
        if self.counts[_B.PENDING] == len(self._states):
            return list(range(len(self._states)))
        return positions(self._states, _PENDING_MASK)

    def replayed(self, index: int, succeeded: bool) -> None:
        """A branch finished in an earlier run (resume): terminal without running."""
        self.move(index, _B.DISPATCHED)
        self.finish(index, _B.SUCCEEDED if succeeded else _B.FAILED)

    def count(self, state: BranchState) -> int:
        return self.counts[state]

    def all_ended(self) -> bool:
        """Every branch reached an end (none pending, dispatched or running)."""
        return sum(self.counts[s] for s in TERMINAL) == len(self._states)


class WorkerState(Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    DEAD = "dead"


_W = WorkerState
WORKER_MOVES: dict[WorkerState, frozenset[WorkerState]] = {
    _W.STARTING: frozenset({_W.IDLE, _W.DEAD}),
    _W.IDLE: frozenset({_W.BUSY, _W.DRAINING, _W.DEAD}),
    _W.BUSY: frozenset({_W.IDLE, _W.DRAINING, _W.DEAD}),
    _W.DRAINING: frozenset({_W.DEAD}),
    _W.DEAD: frozenset(),
}


def check_worker_move(src: WorkerState, dst: WorkerState, pid: int) -> None:
    if dst not in WORKER_MOVES[src]:
        raise IllegalTransition(f"worker pid {pid}: {src.name} -> {dst.name}")
