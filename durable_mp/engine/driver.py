"""The state behind the root context in the driver: the store and the worker pool.

Operations of the handler body itself (root steps, waits, child contexts) run inline in
the driver, like the reference.  Top-level parallel/map go to the dispatcher, and so does
a root step with a timeout, because only a separate process can be killed on time.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from durable_mp.core.records import OpRecord
from durable_mp.core.spec import BatchSpec
from durable_mp.engine.state import ExecutionState


class DriverState(ExecutionState):
    def __init__(self, store: Any, execution_id: str, dispatcher_factory: Callable[[], Any], *,
                 skip_time: bool = False) -> None:
        self.store = store
        self.execution_id = execution_id
        self.skip_time = skip_time
        self.watch_steps = False
        self._dispatcher_factory = dispatcher_factory
        self._dispatcher: Any = None

    @property
    def dispatcher(self) -> Any:
        if self._dispatcher is None:
            self._dispatcher = self._dispatcher_factory()
        return self._dispatcher

    def lookup(self, parent_id: str, op_id: str) -> OpRecord | None:
        return self.store.get_op(self.execution_id, parent_id, op_id)

    def branch_records(self, batch_op_id: str, n: int) -> dict[int, OpRecord]:
        return self.store.branch_records(self.execution_id, batch_op_id)

    def emit(self, rec: OpRecord, sync: bool = False) -> None:
        self.store.stage(self.execution_id, rec)
        if sync:
            self.store.flush()

    def run_batch(self, spec: BatchSpec) -> tuple[dict[int, OpRecord], Any]:
        return self.dispatcher.run_batch(spec)

    def run_step_body(self, func: Any, step_ctx: Any, watch: Any) -> Any:
        if watch is None or not watch.timeout:
            return func(step_ctx)
        extra = {"operationId": watch.record.op_id, "operationName": watch.record.name}
        return self.dispatcher.call(func, step_ctx.attempt, extra, watch.timeout)

    def wait_callback(self, rec: OpRecord) -> OpRecord:
        """Poll the store until another process completes the callback (or it times out)."""
        from durable_mp.operation.callback import CALLBACK_POLL_SECONDS, poll_callback

        self.store.flush()
        while True:
            done = poll_callback(self.store, self.execution_id, rec)
            if done is not None:
                return done
            time.sleep(CALLBACK_POLL_SECONDS)
