"""The state behind the root context in the driver: the store and the worker pool.

Operations of the handler body itself (root steps, waits, child contexts) run inline in
the driver, like the reference.  Top-level parallel/map go to the dispatcher, and so does
a root step with a timeout, because only a separate process can be killed on time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from durable_mp.core.records import OpRecord
from durable_mp.core.spec import BatchSpec
from durable_mp.core.vocabulary import CALLBACK_POLL_SECONDS
from durable_mp.engine.state import ExecutionState


class DriverState(ExecutionState):
    def __init__(self, store: Any, execution_id: str, dispatcher_factory: Callable[[], Any], *,
                 skip_time: bool = False, poll_callback: Callable[[Any, str, OpRecord], OpRecord | None] | None = None
                 ) -> None:
        self.store = store
        self.execution_id = execution_id
        self.skip_time = skip_time
        self.watch_steps = False
        self._dispatcher_factory = dispatcher_factory
        self._dispatcher: Any = None
        self._poll_callback = poll_callback

    @property
    def dispatcher(self) -> Any:
        if self._dispatcher is None:
            self._dispatcher = self._dispatcher_factory()
        return self._dispatcher

    def lookup(self, parent_id: str, op_id: str) -> OpRecord | None:
        rec: OpRecord | None = self.store.get_op(self.execution_id, parent_id, op_id)
        return rec

    def branch_records(self, batch_op_id: str, n: int) -> dict[int, Any]:
        records: dict[int, Any] = self.store.branch_raw(self.execution_id, batch_op_id)  # decoded on demand
        return records

    def branch_outcomes(self, batch_op_id: str, plain: int) -> tuple[list[int], dict[int, Any]]:
        """(plain successes left in the store, other item records): ``Store.branch_outcomes``."""
        out: tuple[list[int], dict[int, Any]] = self.store.branch_outcomes(self.execution_id, batch_op_id, plain)
        return out

    def branch_each(self, batch_op_id: str, indices: Any, fn: Any) -> None:
        self.store.branch_each(self.execution_id, batch_op_id, indices, fn)

    def emit(self, rec: OpRecord, sync: bool = False) -> None:
        self.store.stage(self.execution_id, rec)
        if sync:
            self.store.flush()

    def run_batch(self, spec: BatchSpec) -> tuple[Any, Any]:  # (ItemColumns, CompletionReason)
        outcome: tuple[Any, Any] = self.dispatcher.run_batch(spec)
        return outcome

    def run_step_body(self, func: Any, step_ctx: Any, watch: Any) -> Any:
        if watch is None or not watch.timeout:
            return func(step_ctx)
        extra = {"operationId": watch.record.op_id, "operationName": watch.record.name}
        return self.dispatcher.call(func, step_ctx.attempt, extra, watch.timeout)

    def wait_callback(self, rec: OpRecord) -> OpRecord:
        """Poll the store until another process completes the callback (or it times out)."""
        assert self._poll_callback is not None, "a driver state that runs callbacks needs poll_callback"
        self.store.flush()
        while True:
            done = self._poll_callback(self.store, self.execution_id, rec)
            if done is not None:
                return done
            time.sleep(CALLBACK_POLL_SECONDS)
