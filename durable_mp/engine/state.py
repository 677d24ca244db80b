"""What a ``DurableContext`` needs from the place it runs in, and the part both places share.

Two states implement ``ContextState``: ``DriverState`` (the handler body, in the
driver: store and worker pool) and ``WorkerContextState`` (a branch, in a worker: its
checkpoints in, records out to the driver).  The engine builds contexts for branches
through ``context_factory()``; the context class registers itself there when it is
imported, so the engine does not import the layer above it.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from durable_mp.core.records import OpRecord

if TYPE_CHECKING:  # annotations only: a worker need not import the spec (and dataclasses) to start
    from durable_mp.core.spec import BatchSpec

# Seconds this thread slept under skip_time (instantly): its branch's virtual duration,
# which orders its outcome on the batch's virtual clock (``engine.virtual_clock``).
_slept = threading.local()
# Has any thread of this process slept under skip_time?  Until one has, every count is zero: the
# hot path reads it as ``state.slept_anywhere`` (a module attribute: it is rebound) before calling below.
slept_anywhere = False


def take_slept_seconds() -> float:
    """Seconds slept on this thread since the last call (reset to zero)."""
    if not slept_anywhere:
        return 0.0
    seconds: float = getattr(_slept, "seconds", 0.0)
    _slept.seconds = 0.0
    return seconds


def add_slept_seconds(seconds: float) -> None:
    """Count ``seconds`` of skipped sleep on this thread (a nested batch's virtual duration)."""
    global slept_anywhere
    slept_anywhere = True
    _slept.seconds = getattr(_slept, "seconds", 0.0) + seconds


class ContextState(Protocol):
    """The state behind a context (see the module docstring): all a context and its operations use."""

    @property
    def execution_id(self) -> str: ...
    @property
    def skip_time(self) -> bool: ...  # waits and retry delays take no time (the testing runner)
    @property
    def watch_steps(self) -> bool: ...  # every step is watched by the driver (memory limits)

    # what the store (or the checkpoints a branch was sent with) holds
    def lookup(self, parent_id: str, op_id: str) -> OpRecord | None: ...
    def branch_records(self, batch_op_id: str, n: int) -> dict[int, Any]: ...  # OpRecords or their bytes
    def branch_outcomes(self, batch_op_id: str, plain: int) -> tuple[list[int], dict[int, Any]] | None: ...
    def branch_each(self, batch_op_id: str, indices: Any, fn: Callable[[int, Any], None]) -> None: ...

    # what runs, and what is recorded
    def emit(self, rec: OpRecord, sync: bool = False) -> None: ...
    def run_batch(self, spec: BatchSpec) -> tuple[Any, Any]: ...  # (records or ItemColumns, CompletionReason)
    def run_step_body(self, func: Any, step_ctx: Any, watch: Any) -> Any: ...
    def wait_callback(self, rec: OpRecord) -> OpRecord: ...
    def sleep(self, seconds: float) -> None: ...
    def sleep_until(self, ts: float) -> None: ...


_CONTEXT_FACTORY: list[Callable[..., Any]] = []
CONTEXT_MODULE = "durable_mp.context"  # registers the factory when imported


def register_context_factory(factory: Callable[..., Any]) -> None:
    """Called once by ``durable_mp.context``: how the engine builds a branch's context."""
    _CONTEXT_FACTORY[:] = [factory]


def context_factory() -> Callable[..., Any]:
    """What builds a branch's context: ``factory(state, op_id, parent_id=None)``.

    A process that has not imported the context yet (a Dask worker: ``import durable_mp``
    no longer imports it) imports it by name here; named, not imported, because the engine
    imports nothing above it.
    """
    if not _CONTEXT_FACTORY:
        importlib.import_module(CONTEXT_MODULE)
    if not _CONTEXT_FACTORY:
        raise RuntimeError(f"durable_mp internal error: {CONTEXT_MODULE} did not register its context")
    return _CONTEXT_FACTORY[0]


class ExecutionState:
    """Durable sleeping, honouring ``skip_time`` (retry delays, waits, polls).

    ``skip_time`` makes a sleep instant, and counts it on the thread so that the batch's
    virtual clock orders the branch's outcome as the real clock would (issue 18, defect 6).
    """

    __slots__ = ()
    skip_time: bool

    def sleep(self, seconds: float) -> None:
        if not self.skip_time and seconds > 0:
            time.sleep(seconds)
        elif seconds > 0:
            add_slept_seconds(seconds)

    def sleep_until(self, ts: float) -> None:
        self.sleep(ts - time.time())

    def branch_outcomes(self, batch_op_id: str, plain: int) -> tuple[list[int], dict[int, Any]] | None:
        """Which items of a resumed batch are plain successes left in the store, and the others' records.

        None here: a state without a store of its own (a worker's nested batch) reads its
        items from ``branch_records``.  ``DriverState`` answers from the store.
        """
        return None

    def branch_each(self, batch_op_id: str, indices: Any, fn: Callable[[int, Any], None]) -> None:
        """``fn(index, record bytes)`` for items ``branch_outcomes`` left in the store (so never called here)."""
        raise NotImplementedError("only a state whose branch_outcomes leaves records in the store reads them back")
