"""What a ``DurableContext`` needs from the place it runs in, and the part both places share.

Two states implement ``ContextState``: ``DriverState`` (the handler body, in the
driver: store and worker pool) and ``WorkerState`` (a branch, in a worker: its
checkpoints in, records out to the driver).  The engine builds contexts for branches
through ``context_factory()``; the context class registers itself there when it is
imported, so the engine does not import the layer above it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from durable_mp.core.records import OpRecord


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

    ``skip_time`` makes a sleep instant and nothing else: a branch sleeping keeps its
    ``max_concurrency`` slot, and the completion policy sees outcomes as the real clock
    would deliver them, so a test checks what production runs (issue 18, defect 6).
    """

    __slots__ = ()
    skip_time: bool

    def sleep(self, seconds: float) -> None:
        if not self.skip_time and seconds > 0:
            time.sleep(seconds)

    def sleep_until(self, ts: float) -> None:
        self.sleep(ts - time.time())
