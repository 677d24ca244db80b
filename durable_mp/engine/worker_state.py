"""What a worker shares: with the driver (the shared-memory slot) and with its branches.

The slot is a few 64-bit integers the driver reads without a message: which branch the
worker runs, how far into its chunk it got, how many of its threads sleep durably
(docs/architecture.md "Faults").  ``WorkerShared`` holds the per-process settings every
branch refers to, and ``WorkerContextState`` is the state behind a ``DurableContext``
inside a worker: it answers replay from the checkpoints the branch was dispatched with
and sends every new record to the worker's outbox.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Final

from durable_mp.core.records import OpRecord, operation_id
from durable_mp.engine.state import ExecutionState, context_factory
from durable_mp.exceptions import OrphanedChildException

if TYPE_CHECKING:  # an annotation: a worker imports types (dataclasses) only when a step runs
    from durable_mp.types import StepContext

SLOT_FORMAT: Final = "q"  # the slot: a few signed 64-bit integers
IDLE = -1  # slot[0]: the index of the branch being run, or IDLE
# slot[1]: (task id << PROGRESS_SHIFT) | how many of the chunk's items the worker has begun.  Never
# cleared, so after a death the driver knows which items of its chunk may have started, even
# ones that ended with their records still in the outbox (``faults.split_lost_chunk``).
PROGRESS_SHIFT = 32
# slot[2]: how many of the worker's threads are in a durable sleep (retry delay, wait, poll):
# idle on the CPU without waiting on I/O, so the driver does not grow the pool for them.
SLEEPING = 2


class WorkerShared:
    """Per-process settings every branch state refers to."""

    def __init__(self, outbox: Any, settings: dict[str, Any], slot: Any = None) -> None:
        self.outbox = outbox  # the worker's ``worker.Outbox``
        self.execution_id: str = settings["execution_id"]
        self.skip_time: bool = settings.get("skip_time", False)
        self.watch_steps: bool = settings.get("watch_steps", False)
        self.context_class = context_factory()
        self.slot = slot  # the shared slot (``SLEEPING``); None where no driver reads it
        self.sleep_lock = threading.Lock()  # nested branches' threads sleep concurrently

    def sleeping(self, delta: int) -> None:
        """Count a durable sleep in (+1) or out (-1) of the slot the driver samples."""
        if self.slot is not None:
            with self.sleep_lock:
                self.slot[SLEEPING] += delta


class WorkerContextState(ExecutionState):
    """The state behind a ``DurableContext`` inside a worker: checkpoints in, records out."""

    __slots__ = ("shared", "checkpoints", "cancelled")

    def __init__(self, shared: WorkerShared, checkpoints: dict[str, OpRecord]) -> None:
        self.shared = shared
        self.checkpoints = checkpoints
        self.cancelled = False

    @property
    def execution_id(self) -> str:
        return self.shared.execution_id

    @property
    def skip_time(self) -> bool:  # type: ignore[override]
        return self.shared.skip_time

    @property
    def watch_steps(self) -> bool:
        return self.shared.watch_steps

    def sleep(self, seconds: float) -> None:
        if self.skip_time or seconds <= 0:
            super().sleep(seconds)
            return
        self.shared.sleeping(+1)
        try:
            super().sleep(seconds)
        finally:
            self.shared.sleeping(-1)

    def context(self, op_id: str, parent_id: str | None = None) -> Any:
        """A branch's context; ``parent_id`` (FLAT: the batch) when its records hang elsewhere."""
        return self.shared.context_class(self, op_id, parent_id=parent_id)

    def lookup(self, parent_id: str, op_id: str) -> OpRecord | None:
        return self.checkpoints.get(op_id) if self.checkpoints else None

    def children(self, op_id: str) -> list[OpRecord]:
        return [r for r in self.checkpoints.values() if r.parent_id == op_id]

    def branch_records(self, batch_op_id: str, n: int) -> dict[int, OpRecord]:
        children = self.children(batch_op_id)
        if not children:
            return {}
        index_of = {operation_id(batch_op_id, i): i for i in range(n)}
        return {index_of[r.op_id]: r for r in children if r.op_id in index_of}

    def emit(self, rec: OpRecord, sync: bool = False) -> None:
        if self.cancelled:
            raise OrphanedChildException("branch was abandoned when its batch completed early", rec.op_id)
        self.shared.outbox.add(rec)
        if sync:
            self.shared.outbox.sync()

    def run_batch(self, spec: Any) -> tuple[dict[int, Any], Any]:
        from durable_mp.engine.threads import run_batch_in_threads  # nested batches only: not at start

        return run_batch_in_threads(self, spec)

    def for_branch(self) -> WorkerContextState:
        return WorkerContextState(self.shared, self.checkpoints)

    def cancel(self) -> None:
        self.cancelled = True

    def run_step_body(self, func: Any, step_ctx: StepContext, watch: Any) -> Any:
        if self.cancelled:
            raise OrphanedChildException("branch was abandoned when its batch completed early", "")
        if watch is None:
            return func(step_ctx)
        outbox = self.shared.outbox
        watch_id = outbox.watch_start(watch.record, watch.timeout)
        try:
            return func(step_ctx)
        finally:
            outbox.watch_end(watch_id)

    def wait_callback(self, rec: OpRecord) -> OpRecord:
        """Only the driver reads the store during a run: it answers once the callback is done."""
        reply: OpRecord = self.shared.outbox.wait_callback(rec)
        return reply


