"""The driver's scheduler: runs one top-level parallel/map on the worker pool.

One loop per batch: ask the completion policy whether to go on; fill idle workers (up
to the concurrency limit, in chunks for map, each chunk with the policy's start budget);
wait on the workers' pipes *and* process sentinels; hand every record they stream to
the ``Intake`` (branch state, policy counts, the store's group commit); let the
``Supervisor`` react to deaths, timeouts and memory overruns.  Every fault costs only
the branch it hit (``faults`` decides what it costs).  The dispatcher also runs the
driver's own steps that have a timeout in a worker (``call``), and answers workers
waiting on a callback.

Completion (docs/architecture.md "Completion"): a decision reached by *successes* (``min_successful``, a
custom predicate) terminates the branches still running, which stay STARTED; a
decision reached by *failures* stops starting branches but lets the running ones finish
and report, and the reason is then read from the final state.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from durable_mp.concurrency.models import CompletionReason
from durable_mp.core.nesting import flat_branch_ops
from durable_mp.core.records import OpRecord, operation_id
from durable_mp.core.spec import BatchSpec
from durable_mp.core.vocabulary import CALLBACK_POLL_SECONDS
from durable_mp.engine import pickling
from durable_mp.engine import progress as _progress
from durable_mp.engine.batch_run import BatchRun, Task, Watch
from durable_mp.engine.callback_waits import CallbackWaits, PollCallback
from durable_mp.engine.failures import NULL_FAILURE_LOG, FailureLog
from durable_mp.engine.faults import may_have_started
from durable_mp.engine.intake import Intake
from durable_mp.engine.lifecycle import BranchState, IllegalTransition, WorkerState
from durable_mp.engine.payload import build_payload
from durable_mp.engine.pool import Worker, WorkerPool
from durable_mp.engine.protocol import (
    UNLIMITED,
    Budget,
    CallbackWait,
    CallResult,
    ChunkDone,
    Log,
    ProtocolError,
    Records,
    Reply,
    RunCall,
    RunChunk,
    StopBatch,
    SyncRequest,
    WatchEnd,
    WatchStart,
)
from durable_mp.engine.scheduling import (
    FIRST_CHUNK_ITEMS,
    chunk_size,
    concurrency_limit,
    may_prefetch,
    start_budget,
)
from durable_mp.engine.supervision import Supervisor
from durable_mp.engine.wire import big, wait

MAX_WAIT_SECONDS = 1.0
CHUNK_END_WAIT_SECONDS = 0.05  # a finished batch waits this long for ChunkDone of workers that reported everything
DEFAULT_MAX_CRASH_RETRIES = 3
_FAILED_BY_FAILURES = CompletionReason.FAILURE_TOLERANCE_EXCEEDED



class Dispatcher:
    """Owns the pool for one execution and runs its top-level batches and watched steps.

    It has an ``Intake`` (what workers report) and a ``Supervisor`` (what a fault costs).
    """

    first_chunk_items = FIRST_CHUNK_ITEMS  # a map chunk's size before any item time is known
    virtual_clock = True  # skip_time: outcomes are released by the batch's virtual clock (engine.virtual_clock)

    def __init__(self, store: Any, execution_id: str, pool: WorkerPool | None, *, max_workers: int | None,
                 max_worker_memory: int | None, max_crash_retries: int = DEFAULT_MAX_CRASH_RETRIES,
                 progress: Any = None, poll_callback: PollCallback | None = None) -> None:
        self.store = store
        self.execution_id = execution_id
        self.pool: Any = pool
        self.ncpu = os.cpu_count() or 1
        self.max_workers = max_workers
        self.progress = progress or _progress.NullProgress()
        self.poll_callback = poll_callback
        self.next_task_id = 0
        # keyed by (worker, request id); a worker gone is no longer waited for
        self.callbacks = CallbackWaits(store, execution_id, poll_callback,
                                       alive=lambda key: key[0] in self.pool.workers,
                                       answer=lambda key, done: self._reply(key[0], Reply(key[1], done)))
        self.intake = Intake(store, execution_id)
        self.supervisor = Supervisor(pool, self.intake, max_worker_memory=max_worker_memory,
                                     max_crash_retries=max_crash_retries)

    @property
    def stats(self) -> dict[str, int]:
        return self.supervisor.stats

    # -- public -------------------------------------------------------------------------------
    def run_batch(self, spec: BatchSpec) -> tuple[Any, CompletionReason]:  # ItemColumns
        batch = BatchRun(spec)
        if not self.virtual_clock:
            batch.clock = None
        policy = spec.policy
        intake = self.intake
        spec.replay_into(batch.records)  # the replayed branches end in the item table too
        replayed = spec.done_succeeded()
        batch.queue.extend(batch.branches.pending())
        if spec.resuming and batch.queue:
            # hashing every queued item's id is only needed when some operation other than the
            # root and this batch has children (an item may have checkpoints under it)
            parents = self.store.parents_with_children(self.execution_id) - {""}
            if spec.flat and spec.op_id in parents:  # FLAT: a branch's operations hang off the batch itself
                batch.needs_ckpt = set(batch.queue)  # which branch has some is found as it is dispatched
            elif parents - {spec.op_id}:
                batch.needs_ckpt = {i for i in batch.queue if operation_id(spec.op_id, i) in parents}
            intake.continue_attempts(batch)
        intake.bar = self.progress.start(spec.name or spec.sub_type, spec.n, done=len(replayed),
                                         failed=len(replayed) - sum(replayed.values()))
        intake.failures = FailureLog.of(spec)
        batch.payload = build_payload(spec, lambda index, error: intake.fail_unpicklable(batch, index, error))
        completed = by_successes = False
        try:
            reason = policy.decision()
            while reason is None:
                self._fill(batch)
                if batch.clock is not None and batch.clock.may_release(bool(self._running(batch))):
                    intake.release_held(batch)  # skip_time: one outcome at its virtual time, then fill again
                else:
                    self._pump(batch)
                reason = policy.decision()
            if reason is _FAILED_BY_FAILURES:
                self._drain(batch)
                while batch.clock:  # the sleeping branches finish too
                    intake.release_held(batch)
                reason = CompletionReason.ALL_COMPLETED if batch.branches.all_ended() else _FAILED_BY_FAILURES
            else:
                if batch.clock is not None:
                    intake.record_sleeping(batch)
                by_successes = True
            completed = True
        finally:
            self._close_batch(batch, record_started=completed)
            if by_successes:
                intake.record_admitted(batch)
            self.store.flush()
            intake.bar.close()
            intake.bar = _progress.NULL_BAR
            if completed:
                intake.failures.close(batch.branches.count(BranchState.SUCCEEDED))
            intake.failures = NULL_FAILURE_LOG
        return batch.records.seal(), reason  # the item table says which items succeeded

    def call(self, func: Callable[..., Any], attempt: int, extra: dict[str, Any], timeout: float | None) -> Any:
        """Run one attempt of a driver-level step in a worker so it can be killed on timeout."""
        payload = pickling.dumps((func, attempt, extra))
        task = self._new_task(None, [], timeout)
        while True:
            worker = self._idle_worker() or self.pool.spawn()
            self._assign(worker, task)
            try:
                worker.send(RunCall(task.id, payload))
                break
            except (OSError, EOFError):  # that idle worker had died: use a fresh one
                worker.task = None
                self.pool.reap(worker)
        while task.result is None:
            self._pump(None)
        return pickling.call_outcome(*task.result)

    # -- scheduling -----------------------------------------------------------------------------
    def _running(self, batch: BatchRun) -> list[Worker]:
        return [w for w in self.pool.workers if w.task is not None and w.task.batch is batch]

    def _budget(self, batch: BatchRun, worker: Worker) -> Budget:
        seen = batch.seen.get(worker.pid, (0, 0))
        return self._batch_budget(batch, (seen[0], seen[1]))

    @staticmethod
    def _batch_budget(batch: BatchRun, seen: tuple[int, int]) -> Budget:
        """The start budget of a chunk of ``batch`` (every backend): the policy's distance to a decision."""
        if batch.stopping:
            return UNLIMITED  # only re-dispatches of branches that had started run now
        failures, successes = batch.spec.policy.stop_distance()
        return start_budget(failures, successes, seen)

    def _fill(self, batch: BatchRun) -> None:
        while batch.queue:
            busy = self._running(batch)
            allowed, cap = concurrency_limit(batch.spec.max_concurrency, self.max_workers, self.ncpu,
                                             self.supervisor.waiting_on_io(busy))
            if batch.clock is not None and batch.spec.max_concurrency:
                # skip_time: a sleeping (held) branch keeps its max_concurrency slot; without a
                # max_concurrency it is a worker waiting, which lets another start (as I/O waits do)
                allowed -= len(batch.clock)
            worker = None
            if len(busy) < allowed:
                worker = self._idle_worker()
                if worker is None and len(self.pool) < cap:
                    worker = self.pool.spawn()
            if worker is not None:
                self._send_chunk(batch, worker, self._take_chunk(batch, allowed), self._budget(batch, worker))
                continue
            if batch.clock is not None:  # a chunk queued behind another would start at the wrong virtual time
                return
            has_timeout = batch.spec.branch_timeout is not None or bool(self.supervisor.max_worker_memory)
            if not may_prefetch(is_map=batch.is_map, queued=len(batch.queue), cpu_share=batch.cpu_share,
                                has_timeout=has_timeout):
                return
            # not behind a worker never heard from: it may be an interpreter still booting (spawn), and a
            # chunk queued there would wait for its boot while the others run out of work
            target = next((w for w in busy if w.queued is None and w.heard), None)
            if target is None:
                return
            self._send_chunk(batch, target, self._take_chunk(batch, allowed), self._budget(batch, target),
                             queued=True)

    def _idle_worker(self) -> Worker | None:
        worker: Worker
        for worker in self.pool.workers:
            if worker.task is None and worker.status is WorkerState.IDLE:
                return worker
        return None

    def _take_chunk(self, batch: BatchRun, allowed: int) -> list[int]:
        size = chunk_size(len(batch.queue), allowed, batch.item_seconds, is_map=batch.is_map,
                          has_timeout=batch.spec.branch_timeout is not None, first=self.first_chunk_items)
        queue = batch.queue
        return [queue.popleft() for _ in range(size)]

    def _new_task(self, batch: BatchRun | None, indices: list[int], timeout: float | None) -> Task:
        self.next_task_id += 1
        return Task(self.next_task_id, batch, indices, timeout or None)

    def _assign(self, worker: Worker, task: Task) -> None:
        worker.task = task
        worker.move(WorkerState.BUSY)
        self.supervisor.assigned(worker)

    def _send_chunk(self, batch: BatchRun, worker: Worker, indices: list[int], budget: Budget,
                    queued: bool = False) -> None:
        names, checkpoints = self._prepare_chunk(batch, indices)
        payload = None if batch.token in worker.tokens else big([batch.payload])
        worker.tokens.add(batch.token)
        task = self._new_task(batch, indices, batch.spec.branch_timeout)
        task.seen = batch.seen.setdefault(worker.pid, [0, 0])
        if queued:
            worker.queued = task
        else:
            self._assign(worker, task)
        try:
            worker.send(RunChunk(task.id, batch.token, payload, indices, names, checkpoints, budget))
        except (OSError, EOFError):  # the worker died since we last heard from it
            if queued:
                self.supervisor.on_death(worker)  # a crash during its current task; the queued chunk goes back
            else:
                worker.task = None
                self.pool.reap(worker)
                self.intake.return_unstarted(batch, indices)  # nothing of the chunk ran: no one is to blame

    def _prepare_chunk(self, batch: BatchRun, indices: list[int]) -> tuple[dict[int, str] | None, Any]:
        """Mark a chunk dispatched; return its item names (item_namer) and resumed checkpoints."""
        spec = batch.spec
        checkpoints = None
        if batch.needs_ckpt:
            wanted = [i for i in indices if i in batch.needs_ckpt]
            if wanted:
                self.store.flush()
                checkpoints = {i: self._branch_checkpoints(spec, i) for i in wanted}
        names = None
        if spec.names is not None and spec.funcs is None:
            names = {i: spec.names[i] for i in indices}
        batch.branches.move_many(indices, BranchState.DISPATCHED)
        return names, checkpoints

    def _branch_checkpoints(self, spec: BatchSpec, index: int) -> dict[str, OpRecord]:
        """Every record a branch made (its worker replays them): under its op, or FLAT, under the batch."""
        exec_id = self.execution_id
        out: dict[str, OpRecord] = {}
        if not spec.flat:
            out.update(self.store.subtree(exec_id, operation_id(spec.op_id, index)))
            return out
        for rec in flat_branch_ops(spec.op_id, index, lambda op_id: self.store.get_op(exec_id, spec.op_id, op_id)):
            out[rec.op_id] = rec
            out.update(self.store.subtree(exec_id, rec.op_id))  # a child context's or nested batch's own records
        return out

    # -- the end of a batch ---------------------------------------------------------------------
    def _drain(self, batch: BatchRun) -> None:
        """Failures completed the batch: start nothing new, let the running branches finish and report."""
        batch.stopping = True
        batch.queue.clear()  # never started: left out of the result
        self._stop_starting(batch)
        while self._has_running(batch) or batch.queue:
            self._fill(batch)
            self._pump(batch)

    def _await_chunk_ends(self, batch: BatchRun) -> None:
        """Read the ChunkDone of each worker whose every branch of the batch has reported.

        Such a worker runs nothing more of the batch: it is only sending the end of its chunk.
        Killing it would make the next batch start another worker, which under spawn and
        forkserver is a new interpreter boot.  It gets ``CHUNK_END_WAIT_SECONDS`` at most.
        """
        deadline = time.monotonic() + CHUNK_END_WAIT_SECONDS
        for worker in list(self.pool.workers):
            task = worker.task
            if task is None or task.batch is not batch or worker.queued is not None or task.unreported():
                continue
            while worker.task is task and worker in self.pool.workers:
                left = deadline - time.monotonic()
                ready = wait([worker.conn, worker.sentinel], timeout=left) if left > 0 else []
                if not ready:
                    break
                self._read(worker, worker.sentinel in ready)

    def _has_running(self, batch: BatchRun) -> bool:
        return bool(self._running(batch))

    def _stop_starting(self, batch: BatchRun) -> None:
        """Tell every worker holding a chunk of the batch to start none of its branches that have not started."""
        for worker in self.pool.workers:
            if (worker.task is not None and worker.task.batch is batch) or (
                    worker.queued is not None and worker.queued.batch is batch):
                try:
                    worker.send(StopBatch(batch.token))
                except (OSError, EOFError):
                    pass  # its death is handled when the sentinel is read

    def _close_batch(self, batch: BatchRun, *, record_started: bool) -> None:
        """Stop a finished batch: kill workers still on it, record their branches STARTED."""
        batch.closed = True  # from here on, what a worker still sends of the batch changes nothing in it
        if record_started:
            self._await_chunk_ends(batch)
        for worker in list(self.pool.workers):
            task = worker.task
            on_batch = task is not None and task.batch is batch
            if not on_batch and not (worker.queued is not None and worker.queued.batch is batch):
                continue
            self.pool.kill(worker)
            if not on_batch or not record_started:
                continue
            started = may_have_started(task.indices, task.reported, worker.running_index(),
                                       worker.begun(task.id, len(task.indices)))
            queued = worker.queued
            if queued is not None and queued.batch is batch:  # the worker may be into its prefetched chunk too
                started += queued.indices[:worker.begun(queued.id, len(queued.indices))]
            self.intake.record_started(batch, task, started)
        self.callbacks.prune()

    # -- the event loop -----------------------------------------------------------------------
    def _pump(self, batch: BatchRun | None) -> None:
        busy = [w for w in self.pool.workers if w.task is not None]
        if not busy:
            if batch is not None and batch.queue:
                return
            raise RuntimeError("durable_mp internal error: nothing is running and nothing can start")
        handles: dict[Any, Worker] = {}
        for worker in busy:
            handles[worker.conn] = worker
            handles[worker.sentinel] = worker
        ready = wait(list(handles), timeout=self._wait_seconds(batch))
        exited = {handles[h].pid for h in ready if h is handles[h].sentinel}  # their process has ended
        seen: set[int] = set()
        for handle in ready:
            worker = handles[handle]
            if worker.pid in seen:
                continue
            seen.add(worker.pid)
            if worker.task is not None and worker in self.pool.workers:
                self._read(worker, worker.pid in exited)
        if self.callbacks:
            self.callbacks.poll()
        self.supervisor.watchdog(batch)

    def _wait_seconds(self, batch: BatchRun | None) -> float:
        now = time.monotonic()
        waits = [MAX_WAIT_SECONDS, *self.supervisor.wake_in(batch, now)]
        if self.callbacks:
            waits.append(CALLBACK_POLL_SECONDS)
        if batch is not None and batch.clock:  # skip_time: wake when a held outcome's end comes
            waits.append(batch.clock.seconds_to_next() or 0.0)
        return max(0.0, min(waits))

    def _read(self, worker: Worker, exited: bool) -> None:
        """Handle every complete message the worker sent; then, if its sentinel fired, its death."""
        while worker.task is not None and worker in self.pool.workers:
            try:
                if not worker.conn.poll():
                    if exited and worker.is_dead():  # (without a pidfd the sentinel is the pipe itself)
                        self.supervisor.on_death(worker)
                    return
                msg = worker.recv()
            except (EOFError, OSError):
                self.supervisor.on_death(worker)
                return
            self._handle(worker, msg)

    def _handle(self, worker: Worker, msg: Any) -> None:
        task = worker.task
        match msg:
            case Records():
                self.intake.take(task, msg)
            case SyncRequest():
                self.intake.take(task, msg)
                self.store.flush()
                self._reply(worker, Reply(msg.request_id))
            case ChunkDone():
                self.intake.take(task, msg)
                if task is None or task.id != msg.task_id:
                    raise IllegalTransition(f"worker pid {worker.pid} finished task {msg.task_id}, "
                                            f"but runs {task.id if task else None}")
                self.intake.chunk_done(task, msg)
                self._task_done(worker)
            case WatchStart():
                worker.watches[msg.watch_id] = Watch(msg.record, msg.timeout)
            case WatchEnd():
                worker.watches.pop(msg.watch_id, None)
            case Log():
                record = logging.makeLogRecord(msg.data)
                logging.getLogger(record.name).handle(record)
            case CallbackWait():
                self.callbacks.add((worker, msg.request_id), msg.record)
            case CallResult():
                if task is not None:  # else the call timed out and its worker was killed: a late result
                    task.result = (msg.ok, msg.value)
                    self._task_done(worker)
            case _:
                raise ProtocolError(f"worker pid {worker.pid} sent a {type(msg).__name__}, which the driver "
                                    f"has no use for")

    def _task_done(self, worker: Worker) -> None:
        worker.task, worker.queued = worker.queued, None
        worker.watches.clear()
        if worker.task is not None:
            worker.task.started = time.time()  # the worker moved straight on to it
        else:
            worker.move(WorkerState.IDLE)
            self.supervisor.recycle(worker)

    def _reply(self, worker: Worker, msg: Reply) -> None:
        """Answer a worker's request; a worker that died meanwhile is handled when its sentinel is read."""
        try:
            worker.send(msg)
        except (OSError, EOFError):
            pass
