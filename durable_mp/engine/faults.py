"""What each fault costs, decided in the driver: deaths, timeouts, memory overruns.

Mixed into ``Dispatcher``.  The rule everywhere: the branch a fault hit pays for it
(re-dispatch, or a FAILED item once it crashed ``max_crash_retries`` times); innocent
branches of the same chunk go back to the head of the queue with the checkpoints they
had streamed; an error charged to a running step goes to that step's retry strategy.
"""

from __future__ import annotations

import logging
import time

import psutil

from typing import TYPE_CHECKING

from durable_mp.exceptions import MemoryLimitExceededError, StepTimeoutError, WorkerCrashedError
from durable_mp.lambda_service import ErrorObject
from durable_mp.engine.pool import Worker
from durable_mp.core.records import Attempt, OpStatus

if TYPE_CHECKING:
    from durable_mp.engine.dispatcher import BatchRun, Task

log = logging.getLogger("durable_mp.engine.dispatcher")

CPU_SAMPLE_SECONDS = 0.1  # how often busy workers are checked for sitting idle on the CPU
CPU_IDLE_FRACTION = 0.3  # below this share of a core (and not runnable), a busy worker waits on I/O
MEMORY_POLL_SECONDS = 0.1


class FaultHandling:
    """Fault reactions of the dispatcher (see ``dispatch.Dispatcher`` for the state they use)."""

    def _requeue(self, batch: BatchRun, index: int) -> None:
        batch.queue.appendleft(index)
        batch.needs_ckpt.add(index)
        batch.requeued.add(index)
        self.stats["redispatched"] += 1

    def _lost_task(self, worker: Worker) -> tuple[Task, int | None]:
        """After a worker is gone: requeue the innocent branches of its chunk, return the guilty one."""
        task = worker.task
        running = worker.running_index()
        unreported = task.unreported()
        if running not in unreported:
            running = unreported[0] if unreported else None
        if task.batch is not None and not task.batch.closed:
            queued = worker.queued.indices if worker.queued is not None else []
            for index in reversed([i for i in unreported if i != running] + queued):
                self._requeue(task.batch, index)
        worker.queued = None
        return task, running

    def _on_death(self, worker: Worker) -> None:
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
        if count >= self.max_crash_retries:
            self._fail_item(batch, running, WorkerCrashedError(
                f"branch {running} ({name}) crashed its worker {count} times; last: pid {death.pid}, "
                f"{death.describe()}"), start=task.started, pid=death.pid)
        else:
            self._requeue(batch, running)

    def _kill_for(self, worker: Worker, error: Exception, *, step_scope: bool) -> None:
        """Kill a worker over a limit; charge the error to its watched step or to its branch."""
        watch = worker.watch
        death = self.pool.kill(worker)
        task, running = self._lost_task(worker)
        if task.batch is None:
            task.result = (False, error)
            return
        batch = task.batch
        if running is None or batch.closed:
            return
        if step_scope and watch is not None:
            rec, _deadline, started = watch
            err = ErrorObject.from_exception(error).to_dict()
            attempts = tuple(rec.attempts) + (Attempt(rec.attempt, started, time.time(), death.pid, err),)
            self.store.stage(self.execution_id, rec._replace(
                status=OpStatus.PENDING, error=err, attempts=attempts,
                extra={"undecided": True, "exc": type(error).__name__}))
            self._requeue(batch, running)
        else:
            self._fail_item(batch, running, error, start=task.started)

    def _watchdog(self, batch: BatchRun | None) -> None:
        now = time.monotonic()
        for worker in list(self.pool.workers):
            task = worker.task
            if task is None:
                continue
            if worker.watch is not None and worker.watch[1] is not None and now >= worker.watch[1]:
                self.stats["timeouts"] += 1
                rec = worker.watch[0]
                self._kill_for(worker, StepTimeoutError(f"step {rec.name!r} exceeded its timeout"), step_scope=True)
            elif task.deadline is not None and now >= task.deadline:
                self.stats["timeouts"] += 1
                if task.batch is None:
                    self._kill_for(worker, StepTimeoutError("step exceeded its timeout"), step_scope=False)
                else:
                    index = task.indices[0]
                    self._kill_for(worker, StepTimeoutError(
                        f"branch {index} ({task.batch.spec.item_name(index)}) exceeded its timeout of "
                        f"{task.batch.spec.branch_timeout:g}s"), step_scope=False)
        if self.max_worker_memory and now - self.last_memory_poll >= MEMORY_POLL_SECONDS:
            self.last_memory_poll = now
            for worker in list(self.pool.workers):
                if worker.task is None:
                    continue
                rss = worker.rss()
                if rss > self.max_worker_memory:
                    self.stats["memory_kills"] += 1
                    self._kill_for(worker, MemoryLimitExceededError(
                        f"worker pid {worker.pid} used {rss / 2**20:.1f} MiB, over its limit of "
                        f"{self.max_worker_memory / 2**20:.1f} MiB"), step_scope=True)
        if batch is not None and batch.queue and not batch.spec.max_concurrency:
            self._sample_cpu(now)

    def _sample_cpu(self, now: float) -> None:
        """Mark busy workers that use little CPU, so the pool may add workers for I/O-bound branches."""
        for worker in self.pool.workers:
            if worker.task is None:
                continue
            cpu = worker.cpu_seconds()
            if worker.cpu_mark is None:
                worker.cpu_mark = (now, cpu)
                continue
            then, cpu_then = worker.cpu_mark
            if now - then >= CPU_SAMPLE_SECONDS:
                # little CPU *and* not runnable: a CPU-bound worker starved by a busy machine
                # is runnable ("running") and must not count as waiting on I/O
                self.cpu_idle[worker.pid] = ((cpu - cpu_then) / (now - then) < CPU_IDLE_FRACTION
                                             and worker.state() != psutil.STATUS_RUNNING)
                worker.cpu_mark = (now, cpu)

