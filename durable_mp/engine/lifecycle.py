"""The two state machines of the engine: a branch and a worker, with guarded transitions.

A branch is an item of its batch's one state table (``concurrency.item_table``: PENDING ▶
DISPATCHED ▶ RUNNING ▶ SUCCEEDED | FAILED | ABANDONED, REQUEUED after its worker died),
which the batch's completion tracker reads too; the engine knows it by the names below.
A worker moves STARTING ▶ IDLE ⇄ BUSY ▶ DRAINING ▶ DEAD (DEAD from anywhere).  Any other
move raises ``IllegalTransition``: a bug in the scheduler shows up as an error at the
spot, not as a lost or doubled result later.
"""

from __future__ import annotations

from enum import Enum

from durable_mp.concurrency.item_table import ITEM_MOVES, TERMINAL, WAITING, IllegalTransition, ItemState, ItemTable

BranchState = ItemState
BranchTable = ItemTable
BRANCH_MOVES = ITEM_MOVES
__all__ = ["BRANCH_MOVES", "TERMINAL", "WAITING", "WORKER_MOVES", "BranchState", "BranchTable", "IllegalTransition",
           "WorkerState", "check_worker_move"]


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
