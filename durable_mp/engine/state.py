"""What a ``DurableContext`` needs from the place it runs in, and the part both places share.

Two states implement ``ContextState``: ``DriverState`` (the handler body, in the
driver: store and worker pool) and ``WorkerState`` (a branch, in a worker: its
checkpoints in, records out to the driver).  The engine builds contexts for branches
through ``context_factory()``; the context class registers itself there when it is
imported, so the engine does not import the layer above it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from durable_mp.core.records import OpRecord

# Seconds this thread slept under skip_time (instantly): its branch's virtual duration,
# which orders its outcome on the batch's virtual clock (``engine.virtual_clock``).
_slept = threading.local()


def take_slept_seconds() -> float:
    """Seconds slept on this thread since the last call (reset to zero)."""
    seconds: float = getattr(_slept, "seconds", 0.0)
    _slept.seconds = 0.0
    return seconds


def add_slept_seconds(seconds: float) -> None:
    """Count ``seconds`` of skipped sleep on this thread (a nested batch's virtual duration)."""
    _slept.seconds = getattr(_slept, "seconds", 0.0) + seconds


class ContextState(Protocol):
    """The state behind a context (see the module docstring)."""

    execution_id: str
    skip_time: bool
    watch_steps: bool

    def lookup(self, parent_id: str, op_id: str) -> OpRecord | None: ...
    def branch_records(self, batch_op_id: str, n: int) -> dict[int, Any]: ...  # OpRecords or their bytes
    def emit(self, rec: OpRecord, sync: bool = False) -> None: ...
    def run_batch(self, spec: Any) -> tuple[dict[int, Any], Any]: ...
    def run_step_body(self, func: Any, step_ctx: Any, watch: Any) -> Any: ...
    def wait_callback(self, rec: OpRecord) -> OpRecord: ...
    def sleep(self, seconds: float) -> None: ...
    def sleep_until(self, ts: float) -> None: ...


_CONTEXT_FACTORY: list[Callable[[Any, str], Any]] = []


def register_context_factory(factory: Callable[[Any, str], Any]) -> None:
    """Called once by ``durable_mp.context``: how the engine builds a branch's context."""
    _CONTEXT_FACTORY[:] = [factory]


def context_factory() -> Callable[[Any, str], Any]:
    """What builds a branch's context: ``factory(state, op_id)``."""
    if not _CONTEXT_FACTORY:
        raise RuntimeError("durable_mp internal error: durable_mp.context was never imported in this process")
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
