"""The driver's scheduler: runs one top-level parallel/map on the worker pool.

One loop per batch: ask the completion policy whether to go on; fill idle workers (up
to the concurrency limit, in chunks for map, each chunk with the policy's start budget);
wait on the workers' pipes *and* process sentinels; stage every record they stream into
the store's group commit; feed outcomes to the policy; react to deaths, timeouts and
memory overruns.  Every fault costs only the branch it hit (``faults`` decides what it
costs).

Completion (docs/architecture.md "Completion"): a decision reached by *successes* (``min_successful``, a
custom predicate) terminates the branches still running, which stay STARTED; a
decision reached by *failures* stops starting branches but lets the running ones finish
and report, and the reason is then read from the final state.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from durable_mp.concurrency.models import BatchItemStatus, CompletionReason
from durable_mp.core.item_probe import as_record
from durable_mp.core.nesting import flat_branch_ops
from durable_mp.core.records import (
    Attempt,
    OpRecord,
    OpStatus,
    OpType,
    branch_key,
    operation_id,
)
from durable_mp.core.spec import BatchSpec
from durable_mp.core.vocabulary import CALLBACK_POLL_SECONDS
from durable_mp.engine import pickling
from durable_mp.engine import progress as _progress
from durable_mp.engine.batch_run import BatchRun, Task, Watch
from durable_mp.engine.branch import FatalBranchError, slept_seconds, started_record
from durable_mp.engine.failures import NULL_FAILURE_LOG, FailureLog
from durable_mp.engine.faults import (
    CPU_SAMPLE_SECONDS,
    MEMORY_POLL_SECONDS,
    FaultCost,
    LostChunk,
    death_cost,
    is_waiting_on_io,
    kill_cost,
    may_have_started,
    split_lost_chunk,
)
from durable_mp.engine.lifecycle import BranchState, IllegalTransition, WorkerState
from durable_mp.engine.payload import build_payload
from durable_mp.engine.pool import Worker, WorkerPool
from durable_mp.engine.protocol import (
    NOT_SENT,
    UNLIMITED,
    Budget,
    Kind,
    Reply,
    RunCall,
    RunChunk,
    StopBatch,
    Succeeded,
    kind_of,
)
from durable_mp.engine.result_decode import UNREAD, success_value
from durable_mp.engine.scheduling import (
    FIRST_CHUNK_ITEMS,
    chunk_size,
    concurrency_limit,
    may_prefetch,
    start_budget,
    started_by_the_decision,
)
from durable_mp.engine.wire import big
from durable_mp.exceptions import MemoryLimitExceededError, StepTimeoutError, WorkerCrashedError
from durable_mp.lambda_service import ErrorObject

log = logging.getLogger("durable_mp.dispatch")

MAX_WAIT_SECONDS = 1.0
DEFAULT_MAX_CRASH_RETRIES = 3
_FAILED_BY_FAILURES = CompletionReason.FAILURE_TOLERANCE_EXCEEDED
_ENDED = (BranchState.SUCCEEDED, BranchState.FAILED)  # replayed from the store: never failed again

PollCallback = Callable[[Any, str, OpRecord], "OpRecord | None"]


class Dispatcher:
    """Owns the pool for one execution and runs its top-level batches and watched steps."""

    first_chunk_items = FIRST_CHUNK_ITEMS  # a map chunk's size before any item time is known

    def __init__(self, store: Any, execution_id: str, pool: WorkerPool | None, *, max_workers: int | None,
                 max_worker_memory: int | None, max_crash_retries: int = DEFAULT_MAX_CRASH_RETRIES,
                 progress: Any = None, poll_callback: PollCallback | None = None) -> None:
        self.store = store
        self.execution_id = execution_id
        self.pool: Any = pool
        self.ncpu = os.cpu_count() or 1
        self.max_workers = max_workers
        self.max_worker_memory = max_worker_memory
        self.max_crash_retries = max_crash_retries
        self.progress = progress or _progress.NullProgress()
        self.poll_callback = poll_callback
        self.bar: Any = _progress.NULL_BAR
        self.failures: Any = NULL_FAILURE_LOG  # the running batch's FailureLog (each distinct failure once)
        self.next_task_id = 0
        self.io_waiting: dict[int, bool] = {}  # pid -> busy worker found waiting on I/O
        self.last_memory_poll = 0.0
        self.callback_waiters: dict[tuple[Worker, int], OpRecord] = {}  # (worker, request id) -> callback
        self.stats = {"crashes": 0, "timeouts": 0, "memory_kills": 0, "redispatched": 0}
        self.reopened: dict[tuple[str, int], int] = {}  # (batch token, index) -> attempts before a re-run

    # -- public -------------------------------------------------------------------------------
    def run_batch(self, spec: BatchSpec) -> tuple[Any, CompletionReason]:  # ItemColumns
        batch = BatchRun(spec)
        policy = spec.policy
        spec.replay_into(batch.records)
        replayed = spec.done_succeeded()
        batch.branches.replayed_many(replayed)
        batch.queue.extend(batch.branches.pending())
        if spec.resuming and batch.queue:
            # hashing every queued item's id is only needed when some operation other than the
            # root and this batch has children (an item may have checkpoints under it)
            parents = self.store.parents_with_children(self.execution_id) - {""}
            if spec.flat and spec.op_id in parents:  # FLAT: a branch's operations hang off the batch itself
                batch.needs_ckpt = set(batch.queue)  # which branch has some is found as it is dispatched
            elif parents - {spec.op_id}:
                batch.needs_ckpt = {i for i in batch.queue if operation_id(spec.op_id, i) in parents}
            self._continue_attempts(batch)
        self.bar = self.progress.start(spec.name or spec.sub_type, spec.n, done=len(replayed),
                                       failed=len(replayed) - sum(replayed.values()))
        self.failures = FailureLog.of(spec)
        batch.payload = build_payload(spec, lambda index, error: self._fail_unpicklable(batch, index, error))
        completed = by_successes = False
        try:
            reason = policy.decision()
            while reason is None:
                self._fill(batch)
                if batch.clock is not None and batch.clock.may_release(bool(self._running(batch))):
                    self._release_held(batch)  # skip_time: one outcome at its virtual time, then fill again
                else:
                    self._pump(batch)
                reason = policy.decision()
            if reason is _FAILED_BY_FAILURES:
                self._drain(batch)
                while batch.clock:  # the sleeping branches finish too
                    self._release_held(batch)
                reason = CompletionReason.ALL_COMPLETED if batch.branches.all_ended() else _FAILED_BY_FAILURES
            else:
                if batch.clock is not None:
                    self._record_sleeping(batch)
                by_successes = True
            completed = True
            return batch.records, reason
        finally:
            self._close_batch(batch, record_started=completed)
            if by_successes:
                self._record_admitted(batch)
            self.store.flush()
            self.bar.close()
            self.bar = _progress.NULL_BAR
            if completed:
                self.failures.close(batch.branches.count(BranchState.SUCCEEDED))
            self.failures = NULL_FAILURE_LOG

    def _continue_attempts(self, batch: BatchRun) -> None:
        """Branches a fix-and-resume re-run reopened (``core.reopen``) keep their earlier attempts.

        Only a reopened branch record is STARTED with attempts; its new record continues them.
        The resumed batch's unfinished records came with its spec: the finished ones are not decoded.
        """
        queued = set(batch.queue)
        for index, data in batch.spec.unfinished.items():
            rec = as_record(data)
            if index in queued and rec.status == OpStatus.STARTED and rec.attempts:
                batch.crash_log[index] = list(rec.attempts)
                self.reopened[(batch.token, index)] = rec.attempt

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
        ok, value = task.result
        if ok:
            return pickle.loads(value)
        if isinstance(value, BaseException):
            raise value
        if isinstance(value, bytes):
            raise pickle.loads(value)
        err, _cls_name = value  # an exception that did not survive pickling: its text, as the reference keeps it
        raise ErrorObject.from_dict(err).to_exception()

    # -- scheduling -----------------------------------------------------------------------------
    def _fail_unpicklable(self, batch: BatchRun, index: int, error: Exception) -> None:
        if batch.branches.state(index) in _ENDED:  # its record from an earlier run stands (a resume replays it)
            return
        if index in batch.queue:
            batch.queue.remove(index)
        self._fail_item(batch, index, error)

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
            waiting = sum(1 for w in busy if self.io_waiting.get(w.pid))
            allowed, cap = concurrency_limit(batch.spec.max_concurrency, self.max_workers, self.ncpu, waiting)
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
            if not may_prefetch(is_map=batch.is_map, queued=len(batch.queue), cpu_share=batch.cpu_share,
                                has_timeout=batch.spec.branch_timeout is not None or bool(self.max_worker_memory)):
                return
            target = next((w for w in busy if w.queued is None), None)
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
        deadline = time.monotonic() + timeout if timeout else None
        return Task(self.next_task_id, batch, indices, deadline)

    def _assign(self, worker: Worker, task: Task) -> None:
        worker.task = task
        worker.move(WorkerState.BUSY)
        self.io_waiting.pop(worker.pid, None)
        worker.cpu_mark = None

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
                self._on_death(worker)  # a crash during its current task; the queued chunk goes back
            else:
                worker.task = None
                self.pool.reap(worker)
                self._return_unstarted(batch, indices)  # nothing of the chunk ran: no one is to blame

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
        spec.policy.on_started_many(indices)
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

    def _return_unstarted(self, batch: BatchRun, indices: list[int]) -> None:
        """Branches a worker never started: pending again; queued again unless the batch stops."""
        requeue = not (batch.stopping or batch.closed or batch.spec.policy.is_decided)
        for index in indices:
            if batch.branches.state(index) is not BranchState.DISPATCHED:
                continue
            batch.branches.move(index, BranchState.PENDING)
            batch.spec.policy.on_unstarted(index)
        if requeue:
            batch.queue.extendleft(reversed([i for i in indices if batch.branches.state(i) is BranchState.PENDING]))

    def _drain(self, batch: BatchRun) -> None:
        """Failures completed the batch: start nothing new, let the running branches finish and report."""
        batch.stopping = True
        batch.queue.clear()  # never started: left out of the result
        self._stop_starting(batch)
        while self._has_running(batch) or batch.queue:
            self._fill(batch)
            self._pump(batch)

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
        if self.callback_waiters:
            self._poll_callbacks()
        self._watchdog(batch)

    def _wait_seconds(self, batch: BatchRun | None) -> float:
        now = time.monotonic()
        waits = [MAX_WAIT_SECONDS]
        for worker in self.pool.workers:
            if worker.task is not None and worker.task.deadline is not None:
                waits.append(worker.task.deadline - now)
            waits.extend(w.deadline - now for w in worker.watches.values() if w.deadline is not None)
        if self.max_worker_memory:
            waits.append(MEMORY_POLL_SECONDS)
        if self.callback_waiters:
            waits.append(CALLBACK_POLL_SECONDS)
        if batch is not None and batch.queue and not batch.spec.max_concurrency:
            waits.append(CPU_SAMPLE_SECONDS)
        if batch is not None and batch.clock:  # skip_time: wake when a held outcome's end comes
            waits.append(batch.clock.seconds_to_next() or 0.0)
        return max(0.0, min(waits))

    def _read(self, worker: Worker, exited: bool) -> None:
        """Handle every complete message the worker sent; then, if its sentinel fired, its death."""
        while worker.task is not None and worker in self.pool.workers:
            try:
                if not worker.conn.poll():
                    if exited and worker.is_dead():  # (without a pidfd the sentinel is the pipe itself)
                        self._on_death(worker)
                    return
                msg = worker.recv()
            except (EOFError, OSError):
                self._on_death(worker)
                return
            self._handle(worker, msg)

    def _handle(self, worker: Worker, msg: Any) -> None:
        kind = kind_of(msg)
        task = worker.task
        if kind is Kind.RECORDS or kind is Kind.CHUNK_DONE or kind is Kind.SYNC_REQUEST:
            self._stage_nested(msg.nested)
            if msg.items and task is not None and task.batch is not None:
                self._finish_items(task, msg.items)
            if msg.succeeded is not None and task is not None and task.batch is not None:
                self._finish_succeeded(task, msg.succeeded)
            if kind is Kind.SYNC_REQUEST:
                self.store.flush()
                self._reply(worker, Reply(msg.request_id))
            elif kind is Kind.CHUNK_DONE:
                if task is None or task.id != msg.task_id:
                    raise IllegalTransition(f"worker pid {worker.pid} finished task {msg.task_id}, "
                                            f"but runs {task.id if task else None}")
                if task.batch is not None:
                    if msg.unstarted:
                        self._return_unstarted(task.batch, msg.unstarted)
                    ran = len(task.indices) - len(msg.unstarted)
                    if ran:
                        # the worker's own time for the chunk: a tiny item's round trip would
                        # otherwise look like its cost and keep the chunks of a small map small
                        task.batch.observe(msg.seconds or time.time() - task.started, ran, msg.cpu_share)
                self._task_done(worker)
        elif kind is Kind.WATCH_START:
            worker.watches[msg.watch_id] = Watch(msg.record, msg.timeout)
        elif kind is Kind.WATCH_END:
            worker.watches.pop(msg.watch_id, None)
        elif kind is Kind.LOG:
            record = logging.makeLogRecord(msg.data)
            logging.getLogger(record.name).handle(record)
        elif kind is Kind.CALLBACK_WAIT:
            self.callback_waiters[(worker, msg.request_id)] = msg.record
            self._poll_callbacks()
        elif kind is Kind.CALL_RESULT and task is not None:
            task.result = (msg.ok, msg.value)
            self._task_done(worker)

    def _finish_items(self, task: Task, items: list[Any], released: bool = False) -> None:
        """Hot path: one call per message, a few dict/set operations per finished branch.

        Under skip_time every outcome is held by the batch's virtual clock until its time
        (keeping its slot) and finished here when ``_release_held`` releases it.
        """
        batch = task.batch
        assert batch is not None
        clock = None if released else batch.clock
        reported = task.reported
        if batch.closed:
            reported.update(item[0] for item in items)
            return
        records = batch.records
        on_finished = batch.spec.policy.on_finished
        finish = batch.branches.finish
        tick = None if self.bar is _progress.NULL_BAR else self.bar.item
        crash_log = batch.crash_log
        decode = batch.decode_results
        staged = []
        failed = 0
        held = 0  # outcomes the virtual clock holds: counted when released
        ok: list[int] = []  # succeeded: recorded in the branch table and the policy in one call each
        for index, succeeded, key, data in items:
            if crash_log and index in crash_log:  # rare: keep the deaths in the branch's record
                rec = OpRecord.loads(data)
                data = rec._replace(attempts=tuple(crash_log.pop(index)) + tuple(rec.attempts),
                                    attempt=rec.attempt + self.reopened.pop((batch.token, index), 0)).dumps()
            reported.add(index)
            if clock is not None:
                rec = OpRecord.loads(b"".join(data) if isinstance(data, list) else data)
                if not (rec.extra or {}).get("fatal"):  # a fatal error ends the execution at once
                    clock.hold(index, slept_seconds(rec), (task, (index, succeeded, key, data)))
                    held += 1
                    continue  # it keeps its slot until its time comes (``_release_held``)
            staged.append((key, data))
            # keep the value, not the record: a big map's BatchResult fits in RAM; a record that
            # cannot be read here stays bytes (the BatchResult build reports it)
            value = success_value(data) if succeeded and decode else UNREAD
            if value is UNREAD:
                records[index] = data
            else:
                records.set_item(index, BatchItemStatus.SUCCEEDED, value)
            if succeeded:
                ok.append(index)
            else:
                finish(index, BranchState.FAILED)
                on_finished(index, False)
            if tick is not None:
                tick(succeeded)
            if not succeeded:
                failed += 1
                self.store.stage_many(self.execution_id, batch.spec.op_id, staged)
                staged = []
                rec = OpRecord.loads(data)
                if rec.extra and rec.extra.get("fatal"):
                    raise FatalBranchError(rec)
                self.failures.note(index, rec.error)
        if ok:
            batch.branches.finish_many(ok, BranchState.SUCCEEDED)
            batch.spec.policy.on_succeeded_many(ok)
        self.store.stage_many(self.execution_id, batch.spec.op_id, staged)
        seen = task.seen
        if seen is not None:  # what this worker's budgets count as already known
            seen[0] += failed
            seen[1] += len(items) - failed - held

    def _finish_succeeded(self, task: Task, done: Succeeded) -> None:
        """Hot path: plain successes as columns, a few C-level calls per message (``_finish_items`` for the rest)."""
        batch = task.batch
        assert batch is not None
        indices = done.indices
        task.reported.update(indices)
        if batch.closed:
            return
        if batch.crash_log and not batch.crash_log.keys().isdisjoint(indices):  # rare: keep the deaths
            self._finish_items(task, [(i, True, branch_key(i), OpRecord.loads(data).dumps())
                                      for i, data in zip(indices, done.records, strict=False)])
            return
        if batch.clock is not None:  # skip_time: the virtual clock orders every outcome
            self._finish_items(task, [(i, True, branch_key(i), data)
                                      for i, data in zip(indices, done.records, strict=False)])
            return
        records = batch.records
        if batch.decode_results:  # keep the value, not the record: a big map's BatchResult fits in RAM
            values = done.values
            if NOT_SENT not in values:
                records.set_values(indices, values)
            else:  # decode here; a record that cannot be read here stays bytes (the BatchResult build reports it)
                for index, value, data in zip(indices, values, done.records, strict=True):
                    if value is NOT_SENT:
                        value = success_value(data)
                    if value is UNREAD:
                        records[index] = data
                    else:
                        records.set_value(index, value)
        else:
            records.update(zip(indices, done.records, strict=False))
        batch.branches.finish_many(indices, BranchState.SUCCEEDED)
        batch.spec.policy.on_succeeded_many(indices)
        self.bar.succeeded(len(indices))
        self.store.stage_items(self.execution_id, batch.spec.op_id, indices, done.records)
        if task.seen is not None:  # what this worker's budgets count as already known
            task.seen[1] += len(indices)

    def _fail_item(self, batch: BatchRun, index: int, error: Exception, start: float | None = None,
                   pid: int = 0) -> None:
        spec = batch.spec
        now = time.time()
        attempts = tuple(batch.crash_log.pop(index, ()))
        rec = OpRecord(operation_id(spec.op_id, index), spec.op_id, OpType.CONTEXT, spec.item_sub_type,
                       spec.item_name(index), OpStatus.FAILED, start or now, now, None,
                       ErrorObject.from_exception(error).to_dict(), max(1, len(attempts)), attempts=attempts,
                       pid=pid)
        if batch.branches.state(index) is BranchState.PENDING:
            if spec.policy.is_decided:
                return  # a branch that will never start cannot fail
            batch.branches.move(index, BranchState.FAILED)
        else:
            batch.branches.finish(index, BranchState.FAILED)
        self._record_item(batch, index, rec)
        spec.policy.on_finished(index, False)
        self.bar.item(False)
        self.failures.note(index, rec.error)

    def _release_held(self, batch: BatchRun) -> None:
        """The earliest held outcome counts now (the clock skips to its end if every branch sleeps)."""
        assert batch.clock is not None
        _, (task, item) = batch.clock.release()
        self._finish_items(task, [item], released=True)

    def _record_sleeping(self, batch: BatchRun) -> None:
        """Branches still sleeping when successes completed the batch (skip_time) were running then: STARTED."""
        assert batch.clock is not None
        spec = batch.spec
        now = time.time()
        for index in batch.clock.still_sleeping():
            if batch.branches.state(index) in (BranchState.DISPATCHED, BranchState.RUNNING):
                batch.branches.finish(index, BranchState.ABANDONED)
            self._record_item(batch, index, started_record(spec.op_id, spec.item_sub_type, spec.item_name(index),
                                                           index, now))

    def _record_admitted(self, batch: BatchRun) -> None:
        """Items the batch had started by its decision (``started_by_the_decision``) that no worker
        began, because the pool is smaller than ``max_concurrency``: STARTED, as the reference reports them."""
        spec, policy = batch.spec, batch.spec.policy
        ended = policy.succeeded_count + policy.failed_count - 1  # before the deciding success
        now = time.time()
        for index in range(started_by_the_decision(spec.n, ended, spec.max_concurrency)):
            if index not in batch.records:
                self._record_item(batch, index, started_record(spec.op_id, spec.item_sub_type,
                                                               spec.item_name(index), index, now))

    def _record_item(self, batch: BatchRun, index: int, rec: OpRecord) -> None:
        """A branch record the driver writes itself (failure, abandoned) under the branch's key."""
        batch.records[index] = rec
        self.store.stage_raw(self.execution_id, batch.spec.op_id, branch_key(index), rec.dumps())

    def _record_started(self, batch: BatchRun, task: Task, indices: list[int]) -> None:
        """Branches still running when their batch completed early stay STARTED."""
        spec = batch.spec
        for index in indices:
            if batch.branches.state(index) in (BranchState.DISPATCHED, BranchState.RUNNING):
                batch.branches.finish(index, BranchState.ABANDONED)
            self._record_item(batch, index, started_record(spec.op_id, spec.item_sub_type, spec.item_name(index),
                                                           index, task.started))

    def _stage_nested(self, nested: list[Any]) -> None:
        """Records of operations inside branches (steps, nested batches), as the worker pickled them."""
        stage_raw = self.store.stage_raw
        for parent_id, op_id, data in nested:
            stage_raw(self.execution_id, parent_id, op_id, data)

    def _poll_callbacks(self) -> None:
        for (worker, request_id), rec in list(self.callback_waiters.items()):
            if worker not in self.pool.workers:
                del self.callback_waiters[(worker, request_id)]
                continue
            assert self.poll_callback is not None, "a dispatcher that runs callbacks needs poll_callback"
            done = self.poll_callback(self.store, self.execution_id, rec)
            if done is not None:
                del self.callback_waiters[(worker, request_id)]
                self._reply(worker, Reply(request_id, done))

    def _reply(self, worker: Worker, msg: Reply) -> None:
        """Answer a worker's request; a worker that died meanwhile is handled when its sentinel is read."""
        try:
            worker.send(msg)
        except (OSError, EOFError):
            pass

    def _task_done(self, worker: Worker) -> None:
        worker.task, worker.queued = worker.queued, None
        worker.watches.clear()
        if worker.task is not None:
            worker.task.started = time.time()  # the worker moved straight on to it
        else:
            worker.move(WorkerState.IDLE)
        if self.max_worker_memory and worker.task is None and worker.over(self.max_worker_memory):
            self.pool.kill(worker)  # recycle a worker that grew past the limit between branches

    def _close_batch(self, batch: BatchRun, *, record_started: bool) -> None:
        """Stop a finished batch: kill workers still on it, record their branches STARTED."""
        batch.closed = True
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
            self._record_started(batch, task, started)
        self.callback_waiters = {k: v for k, v in self.callback_waiters.items() if k[0] in self.pool.workers}

    # -- faults -------------------------------------------------------------------------------
    def _requeue(self, batch: BatchRun, index: int) -> None:
        """A branch that started goes back to the head of the queue, with its checkpoints."""
        state = batch.branches.state(index)
        if state is BranchState.DISPATCHED or state is BranchState.RUNNING:
            batch.branches.move(index, BranchState.PENDING)
        batch.queue.appendleft(index)
        batch.needs_ckpt.add(index)
        self.stats["redispatched"] += 1

    def _split_lost(self, worker: Worker, task: Task) -> LostChunk:
        return split_lost_chunk(task.indices, task.reported, worker.running_index(),
                                worker.begun(task.id, len(task.indices)))

    def _lost_task(self, worker: Worker) -> tuple[Task, int | None]:
        """After a worker is gone (death or kill alike): name the guilty branch of its chunk; the
        innocent ones that may have started run again with their checkpoints, the others as they were."""
        task = worker.task
        lost = self._split_lost(worker, task)
        guilty = lost.guilty
        batch = task.batch
        if batch is not None and not batch.closed:
            if guilty is not None and batch.branches.state(guilty) is BranchState.DISPATCHED:
                batch.branches.move(guilty, BranchState.RUNNING)
            for index in reversed(lost.started):
                self._requeue(batch, index)
            self._return_unstarted(batch, lost.unstarted)
        queued = worker.queued
        if queued is not None and queued.batch is not None and not queued.batch.closed:
            # a kill can find the worker already into its prefetched chunk (the ChunkDone before it unread)
            begun = worker.begun(queued.id, len(queued.indices))
            for index in reversed(queued.indices[:begun]):
                self._requeue(queued.batch, index)
            self._return_unstarted(queued.batch, queued.indices[begun:])
        worker.queued = None
        return task, guilty

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
            self._fail_item(batch, running, WorkerCrashedError(
                f"branch {running} ({name}) crashed its worker {count} times; last: pid {death.pid}, "
                f"{death.describe()}"), start=task.started, pid=death.pid)
        else:
            self._requeue(batch, running)

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
            expired = next((w for w in worker.watches.values() if w.deadline is not None and now >= w.deadline), None)
            if expired is not None:
                self.stats["timeouts"] += 1
                self._kill_for(worker, StepTimeoutError(f"step {expired.record.name!r} exceeded its timeout"),
                               step_scoped=True, watch=expired)
            elif task.deadline is not None and now >= task.deadline:
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
            self._sample_cpu(now)

    def _sample_cpu(self, now: float) -> None:
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
