"""The driver's scheduler: runs one top-level parallel/map on the worker pool.

One loop per batch: fill idle workers (up to the concurrency limit, in chunks for map),
wait on the workers' pipes, stage every record they stream into the store's group
commit, feed item outcomes to the completion policy, and react to deaths, timeouts and
memory overruns.  Every fault costs only the branch it hit: innocent branches of a dead
worker's chunk go back to the head of the queue with the checkpoints they streamed.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import uuid
from collections import defaultdict, deque
from multiprocessing.connection import wait
from typing import Any, Callable

from durable_mp.engine import pickling
from durable_mp.engine import wire
from durable_mp.engine import progress as _progress
from durable_mp.concurrency.models import succeeded_item
from durable_mp.engine.branch import raise_if_fatal, started_record
from durable_mp.operation.callback import CALLBACK_POLL_SECONDS, poll_callback
from durable_mp.operation.replay import build_error
from durable_mp.engine.faults import CPU_SAMPLE_SECONDS, MEMORY_POLL_SECONDS, FaultHandling
from durable_mp.lambda_service import ErrorObject
from durable_mp.engine.payload import build_payload
from durable_mp.engine.pool import Worker, WorkerPool
from durable_mp.core.records import Attempt, OpRecord, OpStatus, OpType, branch_key, operation_id, result_view
from durable_mp.serdes import OOB_MAGIC, PickleSerDes, unpickle
from durable_mp.core.spec import BatchSpec

TARGET_CHUNK_SECONDS = 0.05  # a map chunk should keep a worker busy about this long
MAX_CHUNK_ITEMS = 4096
FIRST_CHUNK_ITEMS = 16  # before any item time is measured
PREFETCH_MIN_ITEMS = 64  # below this many queued map items, chunks go only to idle workers
PREFETCH_MAX_NAMED = 500  # item_namer names travel with a chunk: keep queued-ahead messages small
CPU_BOUND_SHARE = 0.7  # parallel branches using at least this share of a core are prefetched
MIN_CHUNK_SECONDS = 0.002  # a chunk should not be shorter than this (the tail of a map)
CHUNKS_PER_WORKER = 4  # never put more than 1/(this * workers) of what is left in one chunk
GROWTH_CAP_PER_CPU = 8  # without explicit limits, the pool grows to at most this many workers per core
MAX_WAIT_SECONDS = 1.0
DEFAULT_MAX_CRASH_RETRIES = 3


class Task:
    """Work one worker is doing: a chunk of branches of a batch, or one step call."""

    __slots__ = ("id", "batch", "indices", "reported", "deadline", "result", "started")

    def __init__(self, task_id: int, batch: "BatchRun | None", indices: list[int], deadline: float | None) -> None:
        self.id = task_id
        self.batch = batch
        self.indices = indices
        self.reported: set[int] = set()
        self.deadline = deadline
        self.result: Any = None
        self.started = time.time()

    def unreported(self) -> list[int]:
        return [i for i in self.indices if i not in self.reported]


class BatchRun:
    """Driver-side state of one batch while it runs."""

    def __init__(self, spec: BatchSpec) -> None:
        self.spec = spec
        self.token = f"{spec.op_id}:{uuid.uuid4().hex}"
        self.payload = b""
        self.queue: deque[int] = deque()
        self.needs_ckpt: set[int] = set()
        self.requeued: set[int] = set()
        self.records: dict[int, OpRecord | bytes] = {}  # bytes: a worker's pickled record
        self.crashes: defaultdict[int, int] = defaultdict(int)
        self.crash_log: dict[int, list[Attempt]] = {}  # deaths of each branch's workers, for its record
        self.item_seconds: float | None = None
        self.closed = False
        # default pickle serdes: results can be decoded right here, as they arrive
        self.decode_results = spec.item_serdes is None or spec.item_serdes.__class__ is PickleSerDes
        # the next chunk may queue behind a busy worker's current one (not with per-branch deadlines)
        self.prefetch = spec.branch_timeout is None
        self.cpu_share: float | None = None  # share of a core a chunk used, as workers report it

    def observe(self, seconds: float, items: int, cpu_share: float | None = None) -> None:
        """Learn from a finished chunk: per-item time (round trip included), share of a core used."""
        took = seconds / items
        self.item_seconds = took if self.item_seconds is None else 0.7 * self.item_seconds + 0.3 * took
        if cpu_share is not None:
            self.cpu_share = cpu_share if self.cpu_share is None else 0.7 * self.cpu_share + 0.3 * cpu_share


class Dispatcher(FaultHandling):
    """Owns the pool for one execution and runs its top-level batches and watched steps."""

    def __init__(self, store: Any, execution_id: str, pool: WorkerPool, *, max_workers: int | None,
                 max_worker_memory: int | None, max_crash_retries: int = DEFAULT_MAX_CRASH_RETRIES,
                 progress: Any = None) -> None:
        self.store = store
        self.execution_id = execution_id
        self.pool = pool
        self.ncpu = os.cpu_count() or 1
        self.max_workers = max_workers
        self.max_worker_memory = max_worker_memory
        self.max_crash_retries = max_crash_retries
        self.progress = progress or _progress.NullProgress()
        self.bar = _progress.NULL_BAR
        self.next_task_id = 0
        self.cpu_idle: dict[int, bool] = {}
        self.last_memory_poll = 0.0
        self.callback_waiters: dict[Worker, OpRecord] = {}  # workers blocked in callback.result()
        self.stats = {"crashes": 0, "timeouts": 0, "memory_kills": 0, "redispatched": 0}

    # -- public -------------------------------------------------------------------------------
    def run_batch(self, spec: BatchSpec) -> tuple[dict[int, OpRecord], Any]:
        batch = BatchRun(spec)
        batch.prefetch = batch.prefetch and not self.max_worker_memory  # recycling needs an empty pipe
        policy = spec.policy
        batch.records = spec.replay_done()
        batch.queue.extend(i for i in range(spec.n) if i not in spec.done)
        if spec.resuming and batch.queue:
            parents = self.store.parents_with_children(self.execution_id)
            batch.needs_ckpt = {i for i in batch.queue if operation_id(spec.op_id, i) in parents}
        self.bar = self.progress.start(spec.name or spec.sub_type, spec.n, done=len(spec.done))
        self._prepare_payload(batch)
        completed = False
        try:
            reason = policy.decision()
            while reason is None:
                self._fill(batch)
                self._pump(batch)
                reason = policy.decision()
            completed = True
            return batch.records, reason
        finally:
            self._close_batch(batch, record_started=completed)
            self.store.flush()
            self.bar.close()
            self.bar = _progress.NULL_BAR

    def call(self, func: Callable, attempt: int, extra: dict, timeout: float | None) -> Any:
        """Run one attempt of a driver-level step in a worker so it can be killed on timeout."""
        payload = pickling.dumps((func, attempt, extra))
        worker = self._idle_worker() or self.pool.spawn()
        task = self._new_task(None, [], timeout)
        worker.task = task
        try:
            worker.send(("C", task.id, payload))
        except OSError:  # that idle worker had died: use a fresh one
            worker.task = None
            self.pool.reap(worker)
            worker = self.pool.spawn()
            worker.task = task
            worker.send(("C", task.id, payload))
        while task.result is None:
            self._pump(None)
        ok, value = task.result
        if ok:
            return pickle.loads(value)
        if isinstance(value, BaseException):
            raise value
        if isinstance(value, bytes):
            raise pickle.loads(value)
        err, cls_name = value
        raise build_error(ErrorObject.from_dict(err), cls_name if cls_name else "DurableOperationError")

    # -- scheduling -----------------------------------------------------------------------------
    def _prepare_payload(self, batch: BatchRun) -> None:
        batch.payload = build_payload(batch.spec, lambda index, error: self._fail_unpicklable(batch, index, error))

    def _fail_unpicklable(self, batch: BatchRun, index: int, error: Exception) -> None:
        self._fail_item(batch, index, error)
        if index in batch.queue:
            batch.queue.remove(index)

    def _limit(self, batch: BatchRun) -> tuple[int, int]:
        """(branches allowed to run now, workers the pool may grow to)."""
        explicit = batch.spec.max_concurrency
        cap = self.max_workers or (explicit if explicit else self.ncpu * GROWTH_CAP_PER_CPU)
        if explicit:
            return explicit, max(cap, 1)
        busy = [w for w in self.pool.workers if w.task is not None and w.task.batch is batch]
        waiting = sum(1 for w in busy if self.cpu_idle.get(w.pid))
        return self.ncpu + waiting, max(cap, 1)

    def _fill(self, batch: BatchRun) -> None:
        while batch.queue:
            running = sum(1 for w in self.pool.workers if w.task is not None and w.task.batch is batch)
            allowed, cap = self._limit(batch)
            worker = None
            if running < allowed:
                worker = self._idle_worker()
                if worker is None and len(self.pool) < cap:
                    worker = self.pool.spawn()
            if worker is not None:
                self._send_chunk(batch, worker, self._take_chunk(batch, allowed))
            elif not self._prefetch(batch, allowed):
                return

    def _prefetch(self, batch: BatchRun, allowed: int) -> bool:
        """Queue a chunk behind a busy worker's current one, so the worker never waits for the driver.

        Only where waiting would not hurt: a map with plenty left to do, or branches known
        to be CPU-bound (an I/O-bound branch queued behind a sleeping one would wait for
        nothing, where the pool would rather grow).
        """
        if not batch.prefetch:
            return False
        if batch.spec.funcs is None:
            if len(batch.queue) < PREFETCH_MIN_ITEMS:
                return False
        elif batch.cpu_share is None or batch.cpu_share < CPU_BOUND_SHARE:
            return False
        for worker in self.pool.workers:
            if worker.task is not None and worker.task.batch is batch and worker.queued is None:
                indices = self._take_chunk(batch, allowed)
                if any(i in batch.needs_ckpt for i in indices) or (
                        batch.spec.names is not None and len(indices) > PREFETCH_MAX_NAMED):
                    # a large message to a busy worker could fill the pipe while the worker
                    # is blocked sending to us: only small chunks are queued ahead
                    batch.queue.extendleft(reversed(indices))
                    return False
                self._send_chunk(batch, worker, indices, queued=True)
                return True
        return False

    def _idle_worker(self) -> Worker | None:
        for worker in self.pool.workers:
            if worker.task is None:
                return worker
        return None

    def _take_chunk(self, batch: BatchRun, allowed: int) -> list[int]:
        spec = batch.spec
        size = 1
        if spec.funcs is None and spec.branch_timeout is None:
            by_share = len(batch.queue) // (CHUNKS_PER_WORKER * max(allowed, 1))
            if batch.item_seconds is None:  # first chunks: small, until the item time is known
                size = max(1, min(by_share, FIRST_CHUNK_ITEMS))
            else:
                item = max(batch.item_seconds, 1e-7)
                by_time = int(TARGET_CHUNK_SECONDS / item)
                at_least = int(MIN_CHUNK_SECONDS / item)
                size = max(1, min(by_time, max(by_share, at_least), MAX_CHUNK_ITEMS))
        queue = batch.queue
        return [queue.popleft() for _ in range(min(size, len(queue)))]

    def _new_task(self, batch: BatchRun | None, indices: list[int], timeout: float | None) -> Task:
        self.next_task_id += 1
        deadline = time.monotonic() + timeout if timeout else None
        return Task(self.next_task_id, batch, indices, deadline)

    def _send_chunk(self, batch: BatchRun, worker: Worker, indices: list[int], queued: bool = False) -> None:
        names, checkpoints = self._prepare_chunk(batch, indices)
        payload = None if batch.token in worker.tokens else wire.big([batch.payload])
        worker.tokens.add(batch.token)
        task = self._new_task(batch, indices, batch.spec.branch_timeout)
        if queued:
            worker.queued = task
        else:
            worker.task = task
            self.cpu_idle.pop(worker.pid, None)
            worker.cpu_mark = None
        try:
            worker.send(("T", task.id, batch.token, payload, indices, names, checkpoints))
        except OSError:  # the worker died since we last heard from it
            if queued:
                self._on_death(worker)  # a crash during its current task; the queued chunk is requeued
            else:
                worker.task = None
                self.pool.reap(worker)
                for index in reversed(indices):  # nothing of the chunk ran: no one is to blame
                    self._requeue(batch, index)

    def _prepare_chunk(self, batch: BatchRun, indices: list[int]) -> tuple[dict | None, dict | None]:
        """Mark a chunk started; return its item names (item_namer) and resumed checkpoints."""
        spec = batch.spec
        checkpoints = None
        if batch.needs_ckpt:
            wanted = [i for i in indices if i in batch.needs_ckpt]
            if wanted:
                self.store.flush()
                checkpoints = {i: self.store.subtree(self.execution_id, operation_id(spec.op_id, i)) for i in wanted}
        names = None
        if spec.names is not None and spec.funcs is None:
            names = {i: spec.names[i] for i in indices}
        for index in indices:
            self._mark_started(batch, index)
        return names, checkpoints

    @staticmethod
    def _mark_started(batch: BatchRun, index: int) -> None:
        """Tell the policy a branch started, once: a re-dispatched branch already did."""
        if index in batch.requeued:
            batch.requeued.discard(index)
        else:
            batch.spec.policy.on_started(index)

    # -- the event loop -----------------------------------------------------------------------
    def _pump(self, batch: BatchRun | None) -> None:
        busy = {w.conn: w for w in self.pool.workers if w.task is not None}
        if not busy:
            if batch is not None and batch.queue:
                return
            raise RuntimeError("durable_mp internal error: nothing is running and nothing can start")
        for conn in wait(list(busy), timeout=self._wait_seconds(batch)):
            worker = busy[conn]
            if worker.task is not None and worker in self.pool.workers:
                self._read(worker)
        if self.callback_waiters:
            self._poll_callbacks()
        self._watchdog(batch)

    def _wait_seconds(self, batch: BatchRun | None) -> float:
        now = time.monotonic()
        waits = [MAX_WAIT_SECONDS]
        for worker in self.pool.workers:
            if worker.task is not None and worker.task.deadline is not None:
                waits.append(worker.task.deadline - now)
            if worker.watch is not None and worker.watch[1] is not None:
                waits.append(worker.watch[1] - now)
        if self.max_worker_memory:
            waits.append(MEMORY_POLL_SECONDS)
        if self.callback_waiters:
            waits.append(CALLBACK_POLL_SECONDS)
        if batch is not None and batch.queue and not batch.spec.max_concurrency:
            waits.append(CPU_SAMPLE_SECONDS)
        return max(0.0, min(waits))

    def _read(self, worker: Worker) -> None:
        while True:
            try:
                msg = wire.recv(worker.conn)
            except (EOFError, OSError):
                self._on_death(worker)
                return
            self._handle(worker, msg)
            try:
                if worker.task is None or not worker.conn.poll():
                    return
            except (EOFError, OSError):
                self._on_death(worker)
                return

    def _handle(self, worker: Worker, msg: tuple) -> None:
        kind = msg[0]
        task = worker.task
        if kind in ("R", "D", "S"):
            nested, items = msg[2], msg[3]
            self._stage_nested(nested)
            if items and task is not None and task.batch is not None:
                self._finish_items(task, items)
            if kind == "S":
                self.store.flush()
                self._reply(worker, ("A",))
            elif kind == "D":
                if task is not None and task.batch is not None and task.indices:
                    task.batch.observe(time.time() - task.started, len(task.indices), msg[4])
                self._task_done(worker)
        elif kind == "W":
            _, _task_id, rec, timeout = msg
            worker.watch = None if rec is None else (rec, time.monotonic() + timeout if timeout else None, time.time())
        elif kind == "L":
            self._log(msg[1])
        elif kind == "K":
            self.callback_waiters[worker] = msg[2]
            self._poll_callbacks()
        elif kind == "V" and task is not None:
            task.result = (msg[2], msg[3])
            self._task_done(worker)

    def _finish_items(self, task: Task, items: list) -> None:
        """Hot path: one call per message, a few dict/set operations per finished branch."""
        batch = task.batch
        reported = task.reported
        if batch.closed:
            reported.update(item[0] for item in items)
            return
        records = batch.records
        on_finished = batch.spec.policy.on_finished
        tick = None if self.bar is _progress.NULL_BAR else self.bar.item
        crash_log = batch.crash_log
        decode = batch.decode_results
        staged = []
        for index, succeeded, key, data in items:
            if crash_log and index in crash_log:  # rare: keep the deaths in the branch's record
                rec = OpRecord.loads(data)
                data = rec._replace(attempts=tuple(crash_log.pop(index)) + tuple(rec.attempts)).dumps()
            reported.add(index)
            staged.append((key, data))
            records[index] = data
            if succeeded and decode:  # keep the value, not the record: a big map's BatchResult fits in RAM
                try:
                    if data.__class__ is bytes:  # a small record: its pickled result follows the header
                        payload = data[5 + int.from_bytes(data[1:5], "little"):]
                        value = unpickle(payload) if payload.startswith(OOB_MAGIC) else pickle.loads(payload)
                    else:
                        value = unpickle(result_view(data))
                    records[index] = succeeded_item(index, value)
                except Exception:  # noqa: BLE001 - the BatchResult build reports it with context
                    pass
            on_finished(index, succeeded)
            if tick is not None:
                tick(succeeded)
            if not succeeded:
                self.store.stage_many(self.execution_id, batch.spec.op_id, staged)
                staged = []
                raise_if_fatal(OpRecord.loads(data))
        self.store.stage_many(self.execution_id, batch.spec.op_id, staged)

    def _fail_item(self, batch: BatchRun, index: int, error: Exception, start: float | None = None,
                   pid: int = 0) -> None:
        spec = batch.spec
        now = time.time()
        attempts = tuple(batch.crash_log.pop(index, ()))
        rec = OpRecord(operation_id(spec.op_id, index), spec.op_id, OpType.CONTEXT, spec.item_sub_type,
                       spec.item_name(index), OpStatus.FAILED, start or now, now, None,
                       ErrorObject.from_exception(error).to_dict(), max(1, len(attempts)), attempts=attempts,
                       pid=pid)
        self._mark_started(batch, index)
        self._record_item(batch, index, rec)
        spec.policy.on_finished(index, False)
        self.bar.item(False)

    def _record_item(self, batch: BatchRun, index: int, rec: OpRecord) -> None:
        """A branch record the driver writes itself (failure, abandoned) under the branch's key."""
        batch.records[index] = rec
        self.store.stage_raw(self.execution_id, batch.spec.op_id, branch_key(index), rec.dumps())

    def _record_started(self, batch: BatchRun, task: Task, indices: list[int]) -> None:
        """Branches still running when their batch completed early stay STARTED."""
        spec = batch.spec
        for index in indices:
            self._record_item(batch, index, started_record(spec.op_id, spec.item_sub_type, spec.item_name(index),
                                                           index, task.started))

    def _stage_nested(self, nested: list) -> None:
        """Records of operations inside branches (steps, nested batches), as the worker pickled them."""
        stage_raw = self.store.stage_raw
        for parent_id, op_id, data in nested:
            stage_raw(self.execution_id, parent_id, op_id, data)

    def _poll_callbacks(self) -> None:
        for worker, rec in list(self.callback_waiters.items()):
            if worker not in self.pool.workers:
                del self.callback_waiters[worker]
                continue
            done = poll_callback(self.store, self.execution_id, rec)
            if done is not None:
                del self.callback_waiters[worker]
                self._reply(worker, ("A", done))

    def _reply(self, worker: Worker, msg: tuple) -> None:
        """Answer a worker's request; a worker that died meanwhile is handled when its EOF is read."""
        try:
            worker.send(msg)
        except OSError:
            pass

    def _task_done(self, worker: Worker) -> None:
        worker.task, worker.queued = worker.queued, None
        if worker.task is not None:
            worker.task.started = time.time()  # the worker moved straight on to it
        worker.watch = None
        if self.max_worker_memory and worker.rss() > self.max_worker_memory:
            self.pool.kill(worker)  # recycle a worker that grew past the limit between branches

    def _log(self, data: dict) -> None:
        record = logging.makeLogRecord(data)
        logging.getLogger(record.name).handle(record)

    def _close_batch(self, batch: BatchRun, *, record_started: bool) -> None:
        """Stop a finished batch: kill workers still on it, record their branches STARTED."""
        batch.closed = True
        for worker in list(self.pool.workers):
            task = worker.task
            if task is None or task.batch is not batch:
                continue
            running = worker.running_index()
            self.pool.kill(worker)
            if not record_started:
                continue
            unreported = task.unreported()
            if running in unreported:
                unreported = unreported[: unreported.index(running) + 1]
            self._record_started(batch, task, unreported)
