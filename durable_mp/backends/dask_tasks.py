"""What runs inside a Dask task: a chunk of branches, a batch's payload, a driver step.

The Dask half of the diagram in ``backends.dask``.  ``run_chunk`` announces its start
(the driver's ``branch_timeout`` runs from then), runs its branches within the start
budget it was given, forwards ``ctx.logger`` records as Dask events, and returns every
record with its result: a Dask worker never touches the store.  Operations that need the
driver while a branch runs are refused here (``refusal``) before their user code runs.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from durable_mp.core.records import OpRecord, OpStatus, OpType
from durable_mp.core.vocabulary import SubType
from durable_mp.engine import pickling
from durable_mp.engine.branch import run_branch
from durable_mp.engine.payload import load_source
from durable_mp.engine.protocol import UNLIMITED, Budget
from durable_mp.engine.scheduling import stop_chunk
from durable_mp.engine.worker import Outbox
from durable_mp.engine.worker_process import record_data
from durable_mp.engine.worker_state import WorkerContextState, WorkerShared
from durable_mp.exceptions import ValidationError
from durable_mp.logger import LOGGER_NAME
from durable_mp.types import StepContext

LOG_LEVEL_KEY = "dask_log_level"  # in the settings: the driver's level for ctx.logger
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


def _joined(parts: list[Any]) -> bytes:
    return b"".join(parts)


class _CollectingOutbox(Outbox):
    """Keeps records in memory; they go back to the driver as the task's result."""

    wrap = staticmethod(_joined)  # Dask serializes the result itself

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

    def chunk_done(self, unstarted: list[int], cpu_share: float, seconds: float = 0.0) -> None:
        return None

    def _due(self) -> None:
        return None

    def sync(self) -> None:
        return None

    def watch_start(self, rec: Any, timeout: float | None) -> int:
        if timeout:  # refused before the body runs: a Dask thread cannot be stopped from outside
            raise ValidationError(
                f"step {_name(rec)} has a timeout, which the Dask backend cannot enforce inside a parallel/map "
                f"branch (a running Dask thread cannot be stopped). Use the branch_timeout of the parallel/map "
                f"(enforced by cancelling the branch's task), run the step in the handler body, or use the local "
                f"backend")
        return 0

    def watch_end(self, watch_id: int) -> None:
        return None


def load_payload(payload: bytes) -> bytes:
    """Dask task holding a batch's code and items: its input is in the graph, so Dask can run it again."""
    return payload


def log_topic(execution_id: str) -> str:
    """The Dask event topic that carries an execution's ``ctx.logger`` records from the workers."""
    return f"durable_mp-log-{execution_id}"


class _EventLogHandler(logging.Handler):
    """On a Dask worker: sends ``ctx.logger`` records to the driver as Dask events (``log_event``).

    A record names its execution (``executionArn``, as ``ctx.logger`` adds to every record);
    records without one are not durable_mp's and stay in the worker's own log.
    """

    def emit(self, record: logging.LogRecord) -> None:
        execution = getattr(record, "executionArn", None)
        if not execution:
            return
        try:
            from distributed import get_worker

            get_worker().log_event(log_topic(execution), record_data(record, getattr(_CURRENT, "index", None)))
        except Exception:  # noqa: BLE001 - logging must never break a branch
            pass


_CURRENT = threading.local()  # the branch a Dask thread runs (its log records name it)
_HANDLER_LOCK = threading.Lock()


def _forward_logs(level: int) -> None:
    """Install the event handler on this worker's ``durable_mp`` logger once; log at the driver's level."""
    logger = logging.getLogger(LOGGER_NAME)
    with _HANDLER_LOCK:
        if not any(isinstance(h, _EventLogHandler) for h in logger.handlers):
            logger.addHandler(_EventLogHandler())
        logger.setLevel(level)


def start_topic(execution_id: str) -> str:
    """The Dask event topic on which a chunk's task says it started running on a worker.

    The driver counts these per task: a task Dask gave up on (``KilledWorker``) is charged
    only for the deaths it was running at, not for those it sat queued behind on a worker
    (Dask counts both); and a chunk's ``branch_timeout`` runs from its start.
    """
    return f"durable_mp-start-{execution_id}"


def _announce_start(execution_id: str) -> None:
    """Tell the driver (through the scheduler, and before any branch runs) that this task started.

    A round trip, not a buffered event: a branch that kills its worker at once must not
    take its announcement down with it.
    """
    from distributed import get_worker
    from distributed.utils import sync

    worker = get_worker()
    sync(worker.loop, worker.scheduler.log_event, topic=start_topic(execution_id),
         msg=str(worker.get_current_task()))


def run_chunk(payload: bytes, token: str, indices: list[int], names: dict | None, checkpoints: dict | None,
              settings: dict, budget: Budget = UNLIMITED) -> tuple[list, list, list[int], float]:
    """Dask task: run the branches ``indices`` of one batch in order.

    Returns their records, the unstarted ones, and the task's own seconds.  ``budget``
    is the chunk's start budget (``scheduling.start_budget``, counted within this chunk):
    no branch starts once the chunk's own outcomes would complete the batch.
    """
    started = time.monotonic()
    _forward_logs(settings.get(LOG_LEVEL_KEY, logging.WARNING))
    try:
        _announce_start(settings["execution_id"])
    except Exception:  # noqa: BLE001 - the scheduler is away: run anyway (counted as never started, boundedly)
        pass
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
    outcomes = [0, 0]  # [failures, successes] of this chunk
    unstarted: list[int] = []
    try:
        for position, index in enumerate(indices):
            if stop_chunk(budget, outcomes[0], outcomes[1]):
                unstarted = list(indices[position:])
                break
            _CURRENT.index = index
            state = WorkerContextState(shared, checkpoints.get(index, empty) if checkpoints else empty)
            rec = run_branch(source, index, state.context)
            outbox.add_item(index, rec)
            outcomes[rec.status == OpStatus.SUCCEEDED] += 1
    finally:
        _CURRENT.index = None
    return outbox.nested, outbox.items, unstarted, time.monotonic() - started


def run_call(payload: bytes) -> Any:
    """Dask task: one attempt of a driver-level step that has a timeout."""
    from durable_mp.logger import Logger

    func, attempt, extra = pickling.loads(payload)
    return func(StepContext(Logger(extra=extra), attempt))
