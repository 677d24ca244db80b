"""Supervision of the worker pool: deaths, kills, timeouts, memory limits, and CPU sampling.

A worker's end (its sentinel fired, or the driver killed it over a limit) costs only the
branch it was running: ``faults`` decides what it costs and which branches of its chunk
go back to the queue with their checkpoints; this module applies the verdict.  The
watchdog enforces step and branch timeouts and the memory limit, and samples the CPU of
busy workers so the pool may grow for branches that wait on I/O (docs/architecture.md
"Faults").
"""

from __future__ import annotations

import logging
import time
from typing import Any

from durable_mp.core.records import Attempt, OpStatus
from durable_mp.engine.batch_run import BatchRun, Task, Watch
from durable_mp.engine.faults import (
    CPU_SAMPLE_SECONDS,
    MEMORY_POLL_SECONDS,
    FaultCost,
    death_cost,
    is_waiting_on_io,
    kill_cost,
    split_lost_chunk,
)
from durable_mp.engine.intake import Intake
from durable_mp.engine.lifecycle import BranchState
from durable_mp.engine.pool import Worker
from durable_mp.exceptions import MemoryLimitExceededError, StepTimeoutError, WorkerCrashedError
from durable_mp.lambda_service import ErrorObject

log = logging.getLogger("durable_mp.dispatch")


class Supervisor:
    """Watches the pool's workers for one execution and applies what a fault costs."""

    def __init__(self, pool: Any, intake: Intake, *, max_worker_memory: int | None, max_crash_retries: int) -> None:
        self.pool = pool
        self.intake = intake
        self.max_worker_memory = max_worker_memory
        self.max_crash_retries = max_crash_retries
        self.io_waiting: dict[int, bool] = {}  # pid -> busy worker found waiting on I/O
        self.last_memory_poll = 0.0
        self.stats = {"crashes": 0, "timeouts": 0, "memory_kills": 0, "redispatched": 0}

    # -- the workers' lives ---------------------------------------------------------------------
    def assigned(self, worker: Worker) -> None:
        """A worker took a new task: what was sampled of its last one no longer says anything."""
        self.io_waiting.pop(worker.pid, None)
        worker.cpu_mark = None

    def waiting_on_io(self, busy: list[Worker]) -> int:
        return sum(1 for w in busy if self.io_waiting.get(w.pid))

    def recycle(self, worker: Worker) -> None:
        """An idle worker that grew past the memory limit between branches is replaced."""
        if self.max_worker_memory and worker.task is None and worker.over(self.max_worker_memory):
            self.pool.kill(worker)

    def wake_in(self, batch: BatchRun | None, now: float) -> list[float]:
        """Seconds until the watchdog has something to check: a deadline, a memory poll, a CPU sample."""
        waits = []
        for worker in self.pool.workers:
            if worker.task is not None and worker.task.deadline is not None:
                waits.append(worker.task.deadline - now)
            waits.extend(w.deadline - now for w in worker.watches.values() if w.deadline is not None)
        if self.max_worker_memory:
            waits.append(MEMORY_POLL_SECONDS)
        if batch is not None and batch.queue and not batch.spec.max_concurrency:
            waits.append(CPU_SAMPLE_SECONDS)
        return waits

    # -- faults ---------------------------------------------------------------------------------
    def requeue(self, batch: BatchRun, index: int) -> None:
        """A branch that started goes back to the head of the queue, with its checkpoints (REQUEUED:
        the completion policy still counts it as started)."""
        state = batch.branches.state(index)
        if state is BranchState.DISPATCHED or state is BranchState.RUNNING:
            batch.branches.move(index, BranchState.REQUEUED)
        batch.queue.appendleft(index)
        batch.needs_ckpt.add(index)
        self.stats["redispatched"] += 1

    def _lost_task(self, worker: Worker) -> tuple[Task, int | None]:
        """After a worker is gone (death or kill alike): name the guilty branch of its chunk; the
        innocent ones that may have started run again with their checkpoints, the others as they were."""
        task = worker.task
        lost = split_lost_chunk(task.indices, task.reported, worker.running_index(),
                                worker.begun(task.id, len(task.indices)))
        guilty = lost.guilty
        batch = task.batch
        if batch is not None and not batch.closed:
            if guilty is not None and batch.branches.state(guilty) is BranchState.DISPATCHED:
                batch.branches.move(guilty, BranchState.RUNNING)
            for index in reversed(lost.started):
                self.requeue(batch, index)
            self.intake.return_unstarted(batch, lost.unstarted)
        queued = worker.queued
        if queued is not None and queued.batch is not None and not queued.batch.closed:
            # a kill can find the worker already into its prefetched chunk (the ChunkDone before it unread)
            begun = worker.begun(queued.id, len(queued.indices))
            for index in reversed(queued.indices[:begun]):
                self.requeue(queued.batch, index)
            self.intake.return_unstarted(queued.batch, queued.indices[begun:])
        worker.queued = None
        return task, guilty

    def on_death(self, worker: Worker) -> None:
        death = self.pool.reap(worker)
        task = worker.task
        if task is None:
            return
        self.stats["crashes"] += 1
        if task.batch is None:
            task.result = (False, WorkerCrashedError(f"worker running a step died: pid {death.pid}, "
                                                     f"{death.describe()}"))
            return
        task, running = self._lost_task(worker)
        batch = task.batch
        assert batch is not None
        if running is None or batch.closed:
            return
        name = batch.spec.item_name(running)
        batch.crashes[running] += 1
        count = batch.crashes[running]
        crash = WorkerCrashedError(f"worker pid {death.pid} died: {death.describe()}")
        batch.crash_log.setdefault(running, []).append(
            Attempt(count, task.started, time.time(), death.pid, ErrorObject.from_exception(crash).to_dict()))
        log.warning("worker pid %d running branch %d (%s) died (%s); crash %d of %d",
                    death.pid, running, name, death.describe(), count, self.max_crash_retries)
        if death_cost(count, self.max_crash_retries) is FaultCost.FAIL_BRANCH:
            self.intake.fail_item(batch, running, WorkerCrashedError(
                f"branch {running} ({name}) crashed its worker {count} times; last: pid {death.pid}, "
                f"{death.describe()}"), start=task.started, pid=death.pid)
        else:
            self.requeue(batch, running)

    def _kill_for(self, worker: Worker, error: Exception, *, step_scoped: bool, watch: Watch | None = None) -> None:
        """Kill a worker over a limit; charge the error to the step it names, or to its branch."""
        watches = [watch] if watch is not None else list(worker.watches.values())
        death = self.pool.kill(worker)
        task, running = self._lost_task(worker)
        if task.batch is None:
            task.result = (False, error)
            return
        batch = task.batch
        if running is None or batch.closed:
            return
        if kill_cost(step_watches=len(watches), step_scoped=step_scoped) is FaultCost.RETRY_STEP:
            rec = watches[0].record
            err = ErrorObject.from_exception(error).to_dict()
            attempts = tuple(rec.attempts) + (Attempt(rec.attempt, watches[0].started, time.time(), death.pid, err),)
            self.intake.store.stage(self.intake.execution_id, rec._replace(
                status=OpStatus.PENDING, error=err, attempts=attempts,
                extra={"undecided": True, "exc": type(error).__name__}))
            self.requeue(batch, running)
        else:
            self.intake.fail_item(batch, running, error, start=task.started)

    def watchdog(self, batch: BatchRun | None) -> None:
        now = time.monotonic()
        for worker in list(self.pool.workers):
            task = worker.task
            if task is None:
                continue
            expired = next((w for w in worker.watches.values() if w.deadline is not None and now >= w.deadline), None)
            if expired is not None:
                self.stats["timeouts"] += 1
                self._kill_for(worker, StepTimeoutError(f"step {expired.record.name!r} exceeded its timeout"),
                               step_scoped=True, watch=expired)
            elif task.deadline is not None and now >= task.deadline:
                if task.timeout is not None and not worker.begun(task.id, max(1, len(task.indices))):
                    # still booting (a new interpreter) or busy before it: the time is not the work's
                    task.deadline = now + task.timeout
                    continue
                self.stats["timeouts"] += 1
                if task.batch is None:
                    self._kill_for(worker, StepTimeoutError("step exceeded its timeout"), step_scoped=False)
                else:
                    index = task.indices[0]
                    self._kill_for(worker, StepTimeoutError(
                        f"branch {index} ({task.batch.spec.item_name(index)}) exceeded its timeout of "
                        f"{task.batch.spec.branch_timeout:g}s"), step_scoped=False)
        if self.max_worker_memory and now - self.last_memory_poll >= MEMORY_POLL_SECONDS:
            self.last_memory_poll = now
            for worker in list(self.pool.workers):
                if worker.task is None:
                    continue
                owned = worker.over(self.max_worker_memory)
                if owned:
                    self.stats["memory_kills"] += 1
                    self._kill_for(worker, MemoryLimitExceededError(
                        f"worker pid {worker.pid} owned {owned / 2**20:.1f} MiB (USS), over its limit of "
                        f"{self.max_worker_memory / 2**20:.1f} MiB"), step_scoped=True)
        if batch is not None and batch.queue and not batch.spec.max_concurrency:
            self.sample_cpu(now)

    def sample_cpu(self, now: float) -> None:
        """Mark busy workers that use little CPU, so the pool may add workers for I/O-bound branches."""
        for worker in self.pool.workers:
            if worker.task is None:
                continue
            if worker.running_index() is None:
                # not running a branch yet (a loaded machine may take a while to wake it): a worker
                # blocked on its pipe is not a branch waiting on I/O
                worker.cpu_mark = None
                self.io_waiting.pop(worker.pid, None)
                continue
            if worker.cpu_mark is None:
                worker.cpu_mark = (now, worker.cpu_seconds())
                continue
            then, cpu_then = worker.cpu_mark
            if now - then >= CPU_SAMPLE_SECONDS:  # reading /proc once per period, not per message
                cpu = worker.cpu_seconds()
                share = (cpu - cpu_then) / (now - then)
                self.io_waiting[worker.pid] = is_waiting_on_io(share, worker.state() == "running", worker.sleeping())
                worker.cpu_mark = (now, cpu)
