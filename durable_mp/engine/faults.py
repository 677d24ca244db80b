"""What each fault costs, as pure decisions: deaths, timeouts, memory overruns.

The rule everywhere: the branch a fault hit pays for it (re-dispatch, or a FAILED item
once it crashed ``max_crash_retries`` times); innocent branches of the same chunk go
back to the queue, each with the checkpoints recorded under it if it may have started
(``split_lost_chunk``); an error charged to a running step goes to that step's retry
strategy.  The dispatcher applies these verdicts.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

CPU_SAMPLE_SECONDS = 0.1  # how often busy workers are checked for sitting idle on the CPU
CPU_IDLE_FRACTION = 0.3  # below this share of a core (and not runnable), a busy worker waits on I/O
MEMORY_POLL_SECONDS = 0.1


class FaultCost(Enum):
    REDISPATCH = "redispatch"  # the branch runs again, from its checkpoints
    FAIL_BRANCH = "fail_branch"  # the branch is recorded FAILED with the fault's error
    RETRY_STEP = "retry_step"  # the step's attempt failed: its retry strategy decides, the branch runs again


def death_cost(crashes: int, max_crash_retries: int) -> FaultCost:
    """A worker died running a branch that has now crashed ``crashes`` times."""
    return FaultCost.FAIL_BRANCH if crashes >= max_crash_retries else FaultCost.REDISPATCH


def kill_cost(*, step_watches: int, step_scoped: bool) -> FaultCost:
    """The driver killed a worker over a limit: charge one step when exactly one can be named."""
    return FaultCost.RETRY_STEP if step_scoped and step_watches == 1 else FaultCost.FAIL_BRANCH


class LostChunk(NamedTuple):
    """What became of a chunk whose worker is gone (``split_lost_chunk``)."""

    guilty: int | None  # the branch charged with the death: re-dispatched with its checkpoints, or failed
    started: list[int]  # innocent, but may have started: re-dispatched with every checkpoint under them
    unstarted: list[int]  # never started: back to the queue as they were


def split_lost_chunk(indices: list[int], reported: set[int], running: int | None, reached: int) -> LostChunk:
    """Split a chunk whose worker is gone (a crash, a timeout kill, a memory kill: all alike).

    ``reached`` is how many of ``indices``, in chunk order, the worker had begun (its shared
    slot); every one of them may have started, even one that ended, since its records may
    have died in the worker's outbox.  The guilty one is the branch the worker was running.
    With the slot cleared, it is the last branch the worker began if unreported (the loop
    had ended: something that branch left behind, a thread say, may be what keeps killing
    it), or, when nothing began, the first one (its chunk killed the worker while loading).
    A branch the worker never began is never blamed: its crash count would be charged for
    nothing, and once ``max_crash_retries`` is used up it would FAIL without having run.
    """
    unreported = [i for i in indices if i not in reported]
    if running not in unreported:
        if reached and indices:
            last = indices[min(reached, len(indices)) - 1]
            running = last if last not in reported else None
        else:
            running = unreported[0] if unreported else None
    begun = set(indices[:reached])
    started = [i for i in unreported if i in begun and i != running]
    unstarted = [i for i in unreported if i not in begun and i != running]
    return LostChunk(running, started, unstarted)


def may_have_started(indices: list[int], reported: set[int], running: int | None, reached: int) -> list[int]:
    """The unreported branches of a chunk killed because its batch completed that may have started.

    The branch the worker was running and every one it had begun (``reached``, as in
    ``split_lost_chunk``), and no other: unlike the blame of a death, which falls on the
    first unreported branch when none is running, a branch the worker never began has no
    record (DESIGN.md §1: never-started items are left out).
    """
    begun = set(indices[:reached])
    return [i for i in indices if i not in reported and (i in begun or i == running)]


def is_waiting_on_io(cpu_share: float, runnable: bool, durable_sleep: bool = False) -> bool:
    """A busy worker using little CPU *and* not runnable waits on I/O (a starved CPU-bound one is runnable).

    A worker sleeping out a retry delay or a wait (``durable_sleep``) is idle too, but not
    on I/O: what it sleeps before (a step's next attempt) is as CPU-bound as before, so a
    worker grown for it would oversubscribe the cores once the sleeps end.
    """
    return cpu_share < CPU_IDLE_FRACTION and not runnable and not durable_sleep
