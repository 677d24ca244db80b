"""What a ``DurableContext`` needs from the place it runs in, and the part both places share.

Two states implement it: ``DriverState`` (the handler body, in the driver: store and
worker pool) and ``WorkerState`` (a branch, in a worker: its checkpoints in, records out
to the driver).  Each provides ``execution_id``, ``skip_time``, ``watch_steps``,
``lookup(parent_id, op_id)``, ``branch_records(batch_op_id, n)``, ``emit(rec, sync)``,
``run_batch(spec)``, ``run_step_body(func, step_ctx, watch)`` and ``wait_callback(rec)``.
"""

from __future__ import annotations

import time


class ExecutionState:
    """Durable sleeping, honouring ``skip_time`` (retry delays, waits, polls)."""

    __slots__ = ()
    skip_time: bool

    def sleep(self, seconds: float) -> None:
        if not self.skip_time and seconds > 0:
            time.sleep(seconds)

    def sleep_until(self, ts: float) -> None:
        self.sleep(ts - time.time())
