"""Run top-level branches on a Dask ``distributed`` cluster; the driver keeps the store.

::

    driver (this process)                         Dask workers
    ┌────────────────────────────────┐  submit   ┌──────────────────────────────┐
    │ DaskDispatcher (scheduling,    ├──────────▶│ run_chunk: branches of one   │
    │  completion policy, LMDB store)│◀──────────┤ chunk, records collected and │
    └────────────────────────────────┘  records  │ returned with the result     │
                                                 └──────────────────────────────┘

Differences from the local pool, by the nature of Dask: records come back when a chunk
finishes (not streamed), so a lost Dask worker costs its whole chunk; Dask itself retries
a task whose worker died (``distributed.scheduler.allowed-failures``) and reports
``KilledWorker`` after that, which fails the branch with ``WorkerCrashedError``; step and
branch timeouts and ``max_worker_memory`` are not enforced (use Dask's worker memory
limits); early completion cancels what has not finished, but a task already running on
a Dask thread runs to its end, unobserved.

Two operations need the driver while a branch runs, and are refused inside Dask-run
branches (``ValidationError``, before any user code of the operation runs):
``AT_MOST_ONCE_PER_RETRY`` steps (their STARTED checkpoint must be committed before the
body runs, and Dask may run a task again after losing its worker) and callbacks
(``create_callback`` / ``wait_for_callback``: the driver answers the wait).  Both work in
the handler body, which runs in the driver.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from durable_mp.core.records import OpRecord, OpStatus, OpType
from durable_mp.core.vocabulary import SubType
from durable_mp.engine import pickling
from durable_mp.engine.branch import run_branch
from durable_mp.engine.dispatcher import BatchRun, Dispatcher
from durable_mp.engine.worker import Outbox, WorkerContextState, WorkerShared, load_source
from durable_mp.exceptions import StepTimeoutError, ValidationError, WorkerCrashedError
from durable_mp.types import StepContext

CHUNKS_IN_FLIGHT_PER_THREAD = 2
_SOURCES: OrderedDict = OrderedDict()
_SOURCES_LOCK = threading.Lock()
_SOURCE_CACHE_SIZE = 4


def refusal(rec: OpRecord) -> ValidationError | None:
    """Why the operation that emits ``rec`` cannot run in a Dask-run branch, or None.

    Every such operation announces itself by a record before it runs user code: an
    ``AT_MOST_ONCE_PER_RETRY`` step by its STARTED record (only those steps write one),
    a callback by its STARTED CALLBACK record, ``wait_for_callback`` by its context's.
    """
    if rec.status != OpStatus.STARTED:
        return None
    if rec.op_type == OpType.STEP:
        return ValidationError(
            f"step {_name(rec)} uses StepSemantics.AT_MOST_ONCE_PER_RETRY, which the Dask backend cannot give "
            f"inside a parallel/map branch: Dask runs a task again when it loses its worker, and the branch's "
            f"checkpoints reach the store only when its task ends, so the step could run twice. Use "
            f"AT_LEAST_ONCE_PER_RETRY (and make the step idempotent), run the step in the handler body (outside "
            f"parallel/map), or use the local backend")
    if rec.op_type == OpType.CALLBACK or (rec.op_type == OpType.CONTEXT and rec.sub_type == SubType.WAIT_FOR_CALLBACK):
        return _callback_refusal(rec)
    return None


def _callback_refusal(rec: OpRecord) -> ValidationError:
    return ValidationError(
        f"callback {_name(rec)}: the Dask backend cannot create or wait for a callback inside a parallel/map "
        f"branch (its id must be in the store before anyone can complete it, and the driver answers the wait, "
        f"but a Dask task has no channel to the driver). Create the callback and wait for it in the handler "
        f"body (outside parallel/map), or use the local backend")


def _name(rec: OpRecord) -> str:
    return repr(rec.name) if rec.name else f"(unnamed, id {rec.op_id[:12]})"


class _CollectingOutbox(Outbox):
    """Keeps records in memory; they go back to the driver as the task's result."""

    wrap = staticmethod(b"".join)  # Dask serializes the result itself

    def __init__(self) -> None:
        super().__init__(channel=None)

    def add(self, rec: OpRecord) -> None:
        refused = refusal(rec)
        if refused is not None:  # before the record is kept: the store never sees the operation start
            raise refused
        super().add(rec)

    def wait_callback(self, rec: OpRecord) -> OpRecord:
        raise _callback_refusal(rec)

    def flush(self) -> None:
        return None

    def chunk_done(self, unstarted: list[int], cpu_share: float) -> None:
        return None

    def _due(self) -> None:
        return None

    def sync(self) -> None:
        return None

    def watch_start(self, rec: Any, timeout: float | None) -> int:
        return 0

    def watch_end(self, watch_id: int) -> None:
        return None


def run_chunk(payload: bytes, token: str, indices: list[int], names: dict | None, checkpoints: dict | None,
              settings: dict) -> tuple[list, list]:
    """Dask task: run the branches ``indices`` of one batch and return their records."""
    with _SOURCES_LOCK:
        source = _SOURCES.get(token)
        if source is None:
            source = _SOURCES[token] = load_source(payload, settings["execution_id"])
            while len(_SOURCES) > _SOURCE_CACHE_SIZE:
                _SOURCES.popitem(last=False)
    if names:
        source = copy.copy(source)
        source.names = names
    outbox = _CollectingOutbox()
    shared = WorkerShared(outbox, settings)
    empty: dict = {}
    for index in indices:
        state = WorkerContextState(shared, checkpoints.get(index, empty) if checkpoints else empty)
        outbox.add_item(index, run_branch(source, index, state.context))
    return outbox.nested, outbox.items


def run_call(payload: bytes) -> Any:
    """Dask task: one attempt of a driver-level step that has a timeout."""
    from durable_mp.logger import Logger

    func, attempt, extra = pickling.loads(payload)
    return func(StepContext(Logger(extra=extra), attempt))


class DaskDispatcher(Dispatcher):
    """The local dispatcher's bookkeeping, with Dask futures instead of worker pipes."""

    def __init__(self, store: Any, execution_id: str, client: Any, *, settings: dict, max_crash_retries: int,
                 progress: Any = None) -> None:
        super().__init__(store, execution_id, pool=None, max_workers=None, max_worker_memory=None,
                         max_crash_retries=max_crash_retries, progress=progress)
        from distributed import as_completed

        self.client = client
        self.settings = settings
        self.futures: dict[Any, Any] = {}
        self.completed = as_completed()
        self.payload_futures: dict[str, Any] = {}

    def _threads(self) -> int:
        try:
            return max(1, sum(self.client.nthreads().values()))
        except Exception:  # noqa: BLE001 - a cluster still starting up
            return 1

    def _fill(self, batch: BatchRun) -> None:
        threads = self._threads()
        limit = batch.spec.max_concurrency or CHUNKS_IN_FLIGHT_PER_THREAD * threads
        payload = self.payload_futures.get(batch.token)
        while batch.queue and len(self.futures) < limit:
            if payload is None:
                payload = self.payload_futures[batch.token] = self.client.scatter(batch.payload, broadcast=True,
                                                                                  hash=False)
            indices = self._take_chunk(batch, min(limit, threads))
            names, checkpoints = self._prepare_chunk(batch, indices)
            future = self.client.submit(run_chunk, payload, batch.token, indices, names, checkpoints,
                                        self.settings, pure=False)
            self.futures[future] = self._new_task(batch, indices, None)
            self.completed.add(future)

    def _pump(self, batch: BatchRun | None) -> None:
        future = next(self.completed)
        task = self.futures.pop(future, None)
        if task is None or task.batch is None or task.batch.closed:
            return
        try:
            nested, items = future.result()
        except Exception as exc:  # noqa: BLE001 - KilledWorker, or the task itself failed
            self._chunk_lost(task, exc)
            return
        self._stage_nested(nested)
        self._finish_items(task, items)
        task.batch.observe(time.time() - task.started, len(task.indices))

    def _has_running(self, batch: BatchRun) -> bool:
        return any(task.batch is batch for task in self.futures.values())

    def _stop_starting(self, batch: BatchRun) -> None:
        """A Dask task cannot be told anything once submitted: its chunk runs to its end."""

    def _chunk_lost(self, task: Any, exc: Exception) -> None:
        """A chunk's worker died more often than Dask tolerates (or the task broke)."""
        batch = task.batch
        unreported = task.unreported()
        if len(unreported) > 1:  # isolate: retry each branch alone once
            for index in reversed(unreported):
                self._requeue(batch, index)
                batch.crashes[index] = max(batch.crashes[index], self.max_crash_retries - 1)
            return
        for index in unreported:
            name = batch.spec.item_name(index)
            self._fail_item(batch, index, WorkerCrashedError(
                f"branch {index} ({name}) was lost on the Dask cluster: {type(exc).__name__}: {exc}"),
                start=task.started)

    def _close_batch(self, batch: BatchRun, *, record_started: bool) -> None:
        batch.closed = True
        for future, task in list(self.futures.items()):
            if task.batch is not batch:
                continue
            future.cancel()
            del self.futures[future]
            if record_started:
                self._record_started(batch, task, task.unreported())
        from distributed import as_completed

        self.completed = as_completed(list(self.futures))
        payload = self.payload_futures.pop(batch.token, None)
        if payload is not None:
            payload.release()

    def call(self, func: Callable, attempt: int, extra: dict, timeout: float | None) -> Any:
        future = self.client.submit(run_call, pickling.dumps((func, attempt, extra)), pure=False)
        try:
            return future.result(timeout=timeout)
        except TimeoutError as exc:
            future.cancel()
            raise StepTimeoutError(f"step exceeded its timeout of {timeout:g}s (the Dask backend cancels the task "
                                   f"but cannot stop a running Dask thread)") from exc


def client_for(backend: Any) -> tuple[Any, bool]:
    """``(client, owned)`` for ``backend="dask"`` (new local cluster or $DASK_SCHEDULER_ADDRESS) or a Client."""
    from distributed import Client

    if isinstance(backend, Client):
        return backend, False
    return Client(), True


__all__ = ["DaskDispatcher", "client_for", "run_chunk", "run_call"]
