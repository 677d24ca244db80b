"""Run top-level branches on a Dask ``distributed`` cluster; the driver keeps the store.

::

    driver (this process)                          Dask workers
    ┌─────────────────────────────────┐  submit   ┌───────────────────────────────┐
    │ DaskDispatcher: the local       ├──────────▶│ load_payload (a task: Dask    │
    │  dispatcher's scheduling (chunk │           │  recomputes it when lost)     │
    │  sizes, start budgets, policy), │◀─ events ─┤ run_chunk: announces its      │
    │  LMDB store, cluster watch      │  (start,  │  start, runs branches within  │
    │                                 │  records, │  its start budget, streams    │
    │                                 │  requests,│  records and forwards         │
    │                                 │  logs)    │  ctx.logger as Dask events    │
    │                                 ├─replies──▶│  (requests wait on a Dask     │
    │                                 │ Variable  │  Variable)                    │
    └─────────────────────────────────┘           └───────────────────────────────┘

What runs inside a Dask task lives in ``backends.dask_tasks``; the driver's end of what
the tasks tell it (starts, streamed records, requests, log lines) in ``backends.dask_stream``
(``WorkerStream``); whether the cluster can run anything, and the wait while it cannot, in
``backends.dask_watch`` (``ClusterWatch``).  The dispatcher here holds one of each and
decides: what to submit, what a finished or failed task means, what a timeout stops.

A batch's code and items are a task of their own (Dask recomputes it when lost), which
chunks find through a Dask ``Variable``: as a graph dependency it would tie every chunk to
its worker.  Dask chunks aim at ``TARGET_CHUNK_SECONDS``.  Records stream from the running
chunks (big ones handed off, the last ones confirmed before a task ends), so a lost worker
costs its running branches only; a task Dask runs again asks the driver what its lost run
recorded (``dask_tasks.run_chunk``).

What a cluster fault costs (``dask_cluster.fault_of``): a lost worker, a cancelled future, a lost
dependency, a closed connection or a lost scheduler puts the chunk's unreported branches
back in the queue, uncharged (Dask itself first re-runs a task whose worker died).
``KilledWorker`` of a chunk runs its branches again one by one; of a single branch it is
charged for the deaths that branch was running at (its start announcements), so only a
branch that keeps killing its worker ends FAILED (``max_crash_retries``).  Without a
scheduler or workers the run waits (Dask config ``durable-mp.cluster-wait``, 300 s), then
raises ``ClusterUnavailableError`` with the execution RUNNING and resumable.

Timeouts: a Dask thread cannot be stopped alone, so a ``branch_timeout`` or a step's
``timeout`` (in a branch or at the root) that runs out cancels the task and restarts its
worker through its nanny, as the local pool kills its worker; Dask runs that worker's other
tasks again, uncharged.  A worker without a nanny is left running the thread (a warning
says so).  ``max_worker_memory`` is refused (Dask workers have their own limit).  The
branches still running when their batch completed early run to their end, unobserved.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

from durable_mp.backends.dask_cluster import (
    CLUSTER_WAIT_KEY,
    RESTART_SECONDS,
    DaskFault,
    client_for,
    drop_payload,
    fault_of,
    processing_on,
    restart_worker,
    submit_payload,
)
from durable_mp.backends.dask_stream import WorkerStream
from durable_mp.backends.dask_tasks import LOG_LEVEL_KEY, load_payload, run_call, run_chunk
from durable_mp.backends.dask_watch import STALL_POLL_SECONDS, ClusterWatch
from durable_mp.core.records import Attempt, OpStatus
from durable_mp.core.vocabulary import CALLBACK_POLL_SECONDS
from durable_mp.engine import pickling
from durable_mp.engine.batch_run import Task, Watch
from durable_mp.engine.dispatcher import BatchRun, Dispatcher
from durable_mp.engine.faults import FaultCost, death_cost
from durable_mp.engine.lifecycle import BranchState
from durable_mp.engine.protocol import Budget
from durable_mp.engine.scheduling import chunk_size, concurrency_limit, stop_chunk
from durable_mp.exceptions import StepTimeoutError, WorkerCrashedError
from durable_mp.lambda_service import ErrorObject
from durable_mp.logger import LOGGER_NAME

log = logging.getLogger("durable_mp.dask")

CHUNKS_IN_FLIGHT_PER_THREAD = 2
FIRST_CHUNK_ITEMS = 4  # before any item time is known
# a Dask task costs scheduler round trips (the local pool's chunk a pipe message): chunks of about this
# long keep that cost small (Dask's advice: tasks of 100 ms or more); a lost worker costs only its
# running items, however long its chunk
TARGET_CHUNK_SECONDS = 0.5
RESULT_WAIT_SECONDS = 1.0  # a finished task's result is fetched within this, else it is being run again
START_POLL_SECONDS = 0.05  # how often the driver looks at the cluster while nothing finishes


class DaskDispatcher(Dispatcher):
    """The local dispatcher's scheduling (chunks, start budgets, completion), with Dask futures as workers.

    Only how chunks travel and how their ends are read is Dask's: which branches start,
    how many, in which chunks and with which budget is decided by the same code as on the
    local pool (``Dispatcher._take_chunk``, ``_batch_budget``, ``_prepare_chunk``,
    ``_return_unstarted``, ``scheduling``).  What a cluster fault costs is ``fault_of``'s
    verdict: only ``KilledWorker`` of a one-branch task is charged to that branch.
    """

    def __init__(self, store: Any, execution_id: str, client: Any, *, settings: dict, max_crash_retries: int,
                 progress: Any = None, cluster_wait: float | None = None, max_workers: int | None = None,
                 reconnect: Callable[[str], Any] | None = None, poll_callback: Any = None) -> None:
        super().__init__(store, execution_id, pool=None, max_workers=max_workers, max_worker_memory=None,
                         max_crash_retries=max_crash_retries, progress=progress, poll_callback=poll_callback)
        self.settings = {**settings, LOG_LEVEL_KEY: logging.getLogger(LOGGER_NAME).getEffectiveLevel()}
        self.cluster = ClusterWatch(client, execution_id, cluster_wait=cluster_wait, reconnect=reconnect,
                                    on_client=self._new_client, on_stall=self._stalled)
        self.by_key: dict[str, Any] = {}  # task key -> its future
        self.stream = WorkerStream(client, execution_id, store, self.intake, self.stats, task_of=self._task_of,
                                   checkpoints=self._branch_checkpoints, poll_callback=poll_callback)
        self.fetching: dict[Any, float] = {}  # future -> since when its result is being fetched
        self.restarts: list[threading.Thread] = []  # workers being restarted: a timed-out branch ran there
        self.queued_kills: dict[tuple[str, int], int] = {}  # KilledWorker of a branch that never announced a start
        self.futures: dict[Any, Task] = {}
        self.budgets: dict[Any, Budget] = {}  # future -> the start budget its chunk was sent with
        self.payload_futures: dict[str, Any] = {}
        self.isolate: set[tuple[str, int]] = set()  # branches of a chunk Dask gave up on: they run alone next

    first_chunk_items = FIRST_CHUNK_ITEMS
    # skip_time on Dask: sleeps are instant, outcomes count as they arrive (the clock needs the
    # local pool's view of which workers run the batch)
    virtual_clock = False

    def run_batch(self, spec: Any) -> Any:
        self.stream.subscribe()
        try:
            return super().run_batch(spec)
        finally:
            self.stream.unsubscribe()
            while self.restarts:  # as on the local pool, a timed-out branch is stopped before its batch returns
                self.restarts.pop().join(RESTART_SECONDS)

    def _task_of(self, key: str) -> Task | None:
        future = self.by_key.get(key)
        return None if future is None else self.futures.get(future)

    def _forget(self, future: Any) -> None:
        """A task's end, for the driver: its fetch, its stream state and its reply Variables."""
        key = str(future.key)
        self.fetching.pop(future, None)
        self.budgets.pop(future, None)
        self.by_key.pop(key, None)
        self.stream.forget(key)

    @property
    def client(self) -> Any:
        return self.cluster.client

    def _new_client(self, client: Any) -> None:
        self.stream.client = client
        self.stream.resubscribe = True
        self.payload_futures.clear()  # the old client's: gone with it

    def _stalled(self) -> None:
        self.stream.resubscribe = True

    def _payload(self, batch: BatchRun) -> None:
        """The batch's payload task (``dask_cluster.submit_payload``), submitted again if it was lost."""
        payload = self.payload_futures.get(batch.token)
        if payload is None or payload.status in ("cancelled", "lost", "error"):
            self.payload_futures[batch.token] = submit_payload(self.client, batch.token, batch.payload)

    # -- scheduling ----------------------------------------------------------------------------
    def _fill(self, batch: BatchRun) -> None:
        if not batch.queue or not self.cluster.connected():
            return
        if self.stream.resubscribe:
            self.stream.subscribe()
        threads = self.cluster.threads()
        if not threads:
            return
        if self.max_workers:  # on Dask: how many of the cluster's threads this run uses at most
            threads = min(threads, self.max_workers)
        allowed, _cap = concurrency_limit(batch.spec.max_concurrency, None, threads, 0)
        limit = allowed
        if not batch.spec.max_concurrency and batch.spec.branch_timeout is None:
            # queued on the workers, so none waits for the driver; unlike the local pool's queued chunks
            # (scheduling.may_prefetch), Dask's work stealing moves a queued task to an idle worker
            limit = CHUNKS_IN_FLIGHT_PER_THREAD * allowed
        running = sum(1 for task in self.futures.values() if task.batch is batch)
        while batch.queue and running < limit:
            if (batch.token, batch.queue[0]) in self.isolate:
                indices = [batch.queue.popleft()]
            else:
                indices = self._take_chunk(batch, allowed)
            budget = self._batch_budget(batch, (0, 0))
            names, checkpoints = self._prepare_chunk(batch, indices)
            self._payload(batch)
            future = self.client.submit(run_chunk, batch.token, indices, names, checkpoints, self.settings, budget,
                                        pure=False)
            self.futures[future] = self._new_task(batch, indices, None)  # a deadline once it starts
            self.budgets[future] = budget
            self.by_key[str(future.key)] = future
            future.add_done_callback(self._woken)
            running += 1

    def _take_chunk(self, batch: BatchRun, allowed: int) -> list[int]:
        size = chunk_size(len(batch.queue), allowed, batch.item_seconds, is_map=batch.is_map,
                          has_timeout=batch.spec.branch_timeout is not None, first=self.first_chunk_items,
                          target=TARGET_CHUNK_SECONDS)
        return [batch.queue.popleft() for _ in range(size)]

    def _pump(self, batch: BatchRun | None) -> None:
        if not self.futures:
            if batch is not None and batch.queue:  # nothing could be submitted
                cluster = self.cluster
                cluster.unavailable("the Dask client is not connected to its scheduler" if not cluster.connected()
                                    else "the Dask cluster has no workers")
                self.cluster.threads(refresh=True)
                return
            raise RuntimeError("durable_mp internal error: nothing is running on Dask and nothing can start")
        done = self._wait(self._wait_seconds_dask())
        stream = self.stream
        stream.emit_logs()
        stream.read_starts()
        stream.read()
        if stream.callback_waits:
            stream.poll_callbacks()
        if done:
            for future in done:
                self._settle(future)
        else:
            self.cluster.check()
        self._expire_deadlines()

    def _woken(self, _future: Any) -> None:
        self.stream.wake.set()

    def _wait(self, timeout: float) -> list[Any]:
        """Until a future finishes or a message is streamed (a request waits for its answer), at most ``timeout``."""
        deadline = time.monotonic() + timeout
        wake = self.stream.wake
        while True:
            wake.clear()
            done = [future for future in self.futures if future.done()]
            remaining = deadline - time.monotonic()
            if done or self.stream.pending() or remaining <= 0:
                return done
            wake.wait(remaining)

    def _wait_seconds_dask(self) -> float:
        now = time.monotonic()
        waits = [STALL_POLL_SECONDS]
        if self.stream.callback_waits:
            waits.append(CALLBACK_POLL_SECONDS)
        waits.extend(task.deadline - now for task in self.futures.values() if task.deadline is not None)
        waits.extend(watch.deadline - now for watches in self.stream.watches.values() for watch in watches.values()
                     if watch.deadline is not None)
        if any(task.deadline is None and task.batch is not None and task.batch.spec.branch_timeout is not None
               for task in self.futures.values()):
            waits.append(START_POLL_SECONDS)  # a timed chunk's start is read soon after it is announced
        return max(0.0, min(waits))

    def _expire_deadlines(self) -> None:
        """Timeouts: cancel the task and restart its worker (which stops the thread, as the local pool's kill).

        A ``branch_timeout`` fails its branch; a step's ``timeout`` is that attempt's error
        (an undecided PENDING record: the branch runs again and the step's retry strategy
        decides).  Its chunk's other unreported branches go back to the queue, uncharged.
        """
        now = time.monotonic()
        for future, task in list(self.futures.items()):
            key = str(future.key)
            watches = self.stream.watches.get(key, {}).values()
            watch = next((w for w in watches if w.deadline is not None and now >= w.deadline), None)
            if task.batch is None or (watch is None and (task.deadline is None or now < task.deadline)):
                continue
            address = self.stream.where.get(key)
            del self.futures[future]
            self._forget(future)
            future.cancel()
            self.stats["timeouts"] += 1
            batch = task.batch
            if watch is not None:
                why = f"step {watch.record.name!r} exceeded its timeout"
                self._step_timed_out(batch, task.unreported(), watch, StepTimeoutError(why))
            else:
                why = f"branch {task.indices[0]} exceeded its timeout"
                for index in task.unreported():
                    self.intake.fail_item(batch, index, StepTimeoutError(
                        f"branch {index} ({batch.spec.item_name(index)}) exceeded its timeout of "
                        f"{batch.spec.branch_timeout:g}s (the Dask backend cancelled its task and restarted its "
                        f"worker)"), start=task.started)
            if address:
                self.restarts.append(restart_worker(self.client, address, why))

    def _step_timed_out(self, batch: BatchRun, unreported: list[int], watch: Watch, error: Exception) -> None:
        """The step's attempt failed with ``error`` (its retry strategy decides when the branch runs again)."""
        rec = watch.record
        err = ErrorObject.from_exception(error).to_dict()
        attempts = (*rec.attempts, Attempt(rec.attempt, watch.started, time.time(), 0, err))
        self.store.stage(self.execution_id, rec._replace(
            status=OpStatus.PENDING, error=err, attempts=attempts,
            extra={"undecided": True, "exc": type(error).__name__}))
        for index in reversed(unreported):
            self.supervisor.requeue(batch, index)

    def _settle(self, future: Any) -> None:
        task = self.futures.get(future)
        runs = self.stream.starts.get(str(future.key), 0)
        if task is None or task.batch is None or task.batch.closed:
            self.futures.pop(future, None)
            self._forget(future)
            return
        try:
            nested, items, unstarted, seconds, run, sent = future.result(timeout=RESULT_WAIT_SECONDS)
        except BaseException as exc:  # noqa: BLE001 - sorted by fault_of below
            if not isinstance(exc, Exception):
                raise
            first = self.fetching.setdefault(future, time.monotonic())
            if isinstance(exc, TimeoutError) and time.monotonic() - first < self.cluster.cluster_wait:
                # a slow fetch, or its result was lost with a worker and Dask runs the task again (which may
                # ask the driver for what the lost run recorded): keep serving the stream meanwhile
                if not future.done():
                    future.add_done_callback(self._woken)
                return
            self.fetching.pop(future, None)
            self.stream.read()  # what the task streamed before it was lost is kept
            del self.futures[future]
            self._forget(future)
            self._lost(task, exc, runs)
            return
        self.fetching.pop(future, None)
        caught_up = self.stream.caught_up(str(future.key), run, sent)
        del self.futures[future]
        self._forget(future)
        if not caught_up:
            self._lost(task, CancelledError("streamed records were lost"), runs)
            return
        self.cluster.available()
        batch = task.batch
        self.intake.stage_nested(nested)
        items = [item for item in items if item[0] not in task.reported]
        if items:
            self.intake.finish_items(task, items)
        if unstarted:
            self.intake.return_unstarted(batch, unstarted)
        ran = len(task.indices) - len(unstarted)
        if ran and run == 1:  # the task's own time: a round trip (and the wait in Dask's queue) is not the
            batch.observe(seconds, ran)  # items' cost; a re-run skipped the items its lost run finished

    def _lost(self, task: Task, exc: Exception, runs: int = 0) -> None:
        """A chunk's task ended without its result: put its branches back, or charge the one that kills workers."""
        batch = task.batch
        assert batch is not None
        unreported = task.unreported()
        fault = fault_of(exc, len(unreported), runs)
        log.warning("Dask task of branches %s ended with %s: %s (%s)", unreported[:8], type(exc).__name__, exc,
                    fault.value)
        if fault is DaskFault.TASK_ERROR:
            for index in unreported:
                self.intake.fail_item(batch, index, WorkerCrashedError(
                    f"branch {index} ({batch.spec.item_name(index)}) could not run on the Dask cluster: "
                    f"{type(exc).__name__}: {exc}"), start=task.started)
            return
        if fault is DaskFault.KILLED_QUEUED:
            key = (batch.token, unreported[0])
            self.queued_kills[key] = self.queued_kills.get(key, 0) + 1
            if self.queued_kills[key] > self.supervisor.max_crash_retries:  # its start announcements are being lost
                fault = DaskFault.KILLED_ALONE
        if fault is DaskFault.KILLED_ALONE:
            index = unreported[0]
            self.stats["crashes"] += 1
            # the deaths it was running at (Dask also counts those it sat queued behind): at least one,
            # so a start announcement lost with its worker cannot keep a branch going forever
            deaths = max(1, min(runs, self.cluster.allowed_failures() + 1))
            batch.crashes[index] += deaths
            count = batch.crashes[index]
            batch.crash_log.setdefault(index, []).append(Attempt(
                count, task.started, time.time(), 0,
                ErrorObject.from_exception(WorkerCrashedError(f"{type(exc).__name__}: {exc}")).to_dict()))
            if death_cost(count, self.supervisor.max_crash_retries) is FaultCost.FAIL_BRANCH:
                self.intake.fail_item(batch, index, WorkerCrashedError(
                    f"branch {index} ({batch.spec.item_name(index)}) killed its Dask worker {count} times "
                    f"(KilledWorker: {exc})"), start=task.started)
                return
            self.supervisor.requeue(batch, index)
            return
        if fault is DaskFault.KILLED_CHUNK:  # one of them kills workers: find it by running each alone
            self.isolate.update((batch.token, index) for index in unreported)
        for index in reversed(unreported):  # infrastructure: back to the queue, uncharged
            self.supervisor.requeue(batch, index)

    def _has_running(self, batch: BatchRun) -> bool:
        return any(task.batch is batch for task in self.futures.values())

    def _stop_starting(self, batch: BatchRun) -> None:
        """A submitted chunk carries its start budget; nothing more can be told to a Dask task."""

    def _may_be_running(self, task: Task, budget: Budget | None) -> list[int]:
        """A cut-short chunk's branch that may have started: its first unreported one, unless the
        chunk's own outcomes had used up its start budget (``run_chunk`` then started no other)."""
        if budget is not None and task.batch is not None:
            failed = sum(1 for i in task.reported if task.batch.branches.state(i) is BranchState.FAILED)
            if stop_chunk(budget, failed, len(task.reported) - failed):
                return []
        return task.unreported()[:1]

    def _close_batch(self, batch: BatchRun, *, record_started: bool) -> None:
        batch.closed = True
        for future, task in list(self.futures.items()):
            if task.batch is not batch:
                continue
            budget = self.budgets.get(future)
            future.cancel()
            del self.futures[future]
            self._forget(future)
            if record_started:  # as on the local pool: the one that may be running stays STARTED
                self.intake.record_started(batch, task, self._may_be_running(task, budget))
        self.isolate = {key for key in self.isolate if key[0] != batch.token}
        self.queued_kills = {key: n for key, n in self.queued_kills.items() if key[0] != batch.token}
        payload = self.payload_futures.pop(batch.token, None)
        if payload is not None:
            drop_payload(self.client, batch.token, payload)

    def call(self, func: Callable, attempt: int, extra: dict, timeout: float | None) -> Any:
        data = pickling.dumps((func, attempt, extra))
        while True:
            while not self.cluster.connected() or not self.cluster.threads():
                self.cluster.unavailable("the Dask cluster cannot run the step (no scheduler, or no workers)")
                self.cluster.threads(refresh=True)
            future = self.client.submit(run_call, data, pure=False)
            try:
                return future.result(timeout=timeout)
            except TimeoutError as exc:
                address = processing_on(self.client, str(future.key))
                future.cancel()
                if address:  # the body is stopped before the handler goes on, as the local pool's kill does
                    restart_worker(self.client, address, "a step exceeded its timeout").join(RESTART_SECONDS)
                raise StepTimeoutError(f"step exceeded its timeout of {timeout:g}s (the Dask backend cancelled "
                                       f"the task and restarted its worker)") from exc
            except Exception as exc:
                if fault_of(exc, 1) is not DaskFault.INFRASTRUCTURE:
                    raise
                log.warning("Dask task of a step ended with %s: %s; submitting it again", type(exc).__name__, exc)
                self.cluster.check()


__all__ = ["CLUSTER_WAIT_KEY", "DaskDispatcher", "DaskFault", "client_for", "fault_of", "load_payload", "run_chunk",
           "run_call"]
