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

Records stream (``_StreamingOutbox``): a running chunk sends its records every
``STREAM_FLUSH_SECONDS`` as events on the execution's records topic, each message tagged
(task key, run, sequence number); the driver applies each run's messages in order
(``_DriverStream``) and stages them as they come, so a lost worker costs its running
branches only.  Messages over ``STREAM_MAX_BYTES`` (big results) wait for the task's
result, which also carries how many messages were streamed: the driver applies the
result only after all of them (else the task counts as lost).  Three requests wait for the
driver's answer, a Dask ``Variable`` per request: ``SYNC`` (an ``AT_MOST_ONCE_PER_RETRY``
step's STARTED record is committed before its body runs), ``CALLBACK`` (the driver answers
once the callback is done) and ``RERUN``: Dask runs a task again with its original
arguments after losing its worker; the task counts its runs on a per-task event topic at
the scheduler, and a second run first asks the driver for what the earlier runs recorded
(their finished branches are skipped, the running one replays its checkpoints).

What a cluster fault costs (``fault_of``): a lost worker, a cancelled future, a lost
dependency, a closed connection or a lost scheduler puts the chunk's unreported branches
back in the queue, uncharged (Dask itself first re-runs a task whose worker died).
``KilledWorker`` of a chunk runs its branches again one by one; of a single branch it is
charged for the deaths that branch was running at (its start announcements), so only a
branch that keeps killing its worker ends FAILED (``max_crash_retries``).  Without a
scheduler or workers the run waits (Dask config ``durable-mp.cluster-wait``, 300 s), then
raises ``ClusterUnavailableError`` with the execution RUNNING and resumable.

Differences from the local pool, by the nature of Dask: ``branch_timeout`` cancels the
task and fails the branch, but a running Dask thread runs to its end, unobserved (so does
one of a batch that completed early); ``max_worker_memory`` is refused (Dask workers have
their own limit); steps with a ``timeout`` inside Dask-run branches are refused
(``ValidationError`` before the body runs: a Dask thread cannot be stopped alone).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import CancelledError
from enum import Enum
from typing import Any

from durable_mp.core.records import Attempt, OpRecord, OpStatus
from durable_mp.core.vocabulary import CALLBACK_POLL_SECONDS
from durable_mp.engine import pickling
from durable_mp.engine.batch_run import Task
from durable_mp.engine.branch import run_branch
from durable_mp.engine.dispatcher import BatchRun, Dispatcher
from durable_mp.engine.faults import FaultCost, death_cost
from durable_mp.engine.lifecycle import BranchState
from durable_mp.engine.payload import load_source
from durable_mp.engine.protocol import UNLIMITED, Budget
from durable_mp.engine.scheduling import concurrency_limit, stop_chunk
from durable_mp.engine.worker import Outbox
from durable_mp.engine.worker_process import record_data
from durable_mp.engine.worker_state import WorkerContextState, WorkerShared
from durable_mp.exceptions import ClusterUnavailableError, StepTimeoutError, ValidationError, WorkerCrashedError
from durable_mp.lambda_service import ErrorObject
from durable_mp.logger import LOGGER_NAME
from durable_mp.types import StepContext

log = logging.getLogger("durable_mp.dask")

CHUNKS_IN_FLIGHT_PER_THREAD = 2
FIRST_CHUNK_ITEMS = 4  # before any item time is known
LOG_LEVEL_KEY = "dask_log_level"  # in the settings: the driver's level for ctx.logger
CLUSTER_WAIT_KEY = "durable-mp.cluster-wait"  # Dask config: seconds a run waits for an unavailable cluster
DEFAULT_CLUSTER_WAIT = 300.0
DASK_DEFAULT_ALLOWED_FAILURES = 3  # distributed.scheduler.allowed-failures
STALL_POLL_SECONDS = 1.0
STREAM_POLL_SECONDS = 0.01
RESULT_WAIT_SECONDS = 1.0  # a finished task's result is fetched within this, else it is being run again
START_POLL_SECONDS = 0.05  # how often the driver looks at the cluster while nothing finishes
THREADS_REFRESH_SECONDS = 5.0  # the workers' thread count is asked of the scheduler at most this often
STREAM_FLUSH_SECONDS = 0.02  # a record waits at most this long on the worker before it is streamed
STREAM_MAX_BYTES = 256 * 1024  # larger messages wait for the task's result: big data does not go through the scheduler
STREAM_CATCHUP_SECONDS = 10.0  # how long a finished task's result waits for its streamed messages, then it is lost
REPLY_TIMEOUT = 3600.0  # a worker waits this long for the driver's answer to a request
PAYLOAD_PRIORITY = 10  # a batch's payload task runs before its chunks (which depend on it anyway)
_INFRASTRUCTURE_NAMES = frozenset({"CommClosedError", "FutureCancelledError", "StreamClosedError"})
_SOURCES: OrderedDict = OrderedDict()
_SOURCES_LOCK = threading.Lock()
_SOURCE_CACHE_SIZE = 4


def _name(rec: OpRecord) -> str:
    return repr(rec.name) if rec.name else f"(unnamed, id {rec.op_id[:12]})"


class StreamRequest(str, Enum):
    """What a streamed message asks of the driver, which answers through a Dask ``Variable``."""

    NONE = ""
    SYNC = "sync"  # commit everything streamed so far (an AT_MOST_ONCE step's STARTED record), then reply
    RERUN = "rerun"  # Dask runs this task again (it lost its worker): reply with what the earlier runs recorded
    CALLBACK = "callback"  # reply with the callback's record once it is done (completed, failed or timed out)


class _StreamingOutbox(Outbox):
    """Streams a chunk's records to the driver as Dask events while it runs.

    Every message names its task's key, its run (Dask may run a task again) and a sequence
    number, so the driver applies one run's messages in the order they were produced
    (``_DriverStream``), as it does a local worker's pipe.  A message larger than
    ``STREAM_MAX_BYTES`` (and all after it, to keep the order) waits for the task's result
    instead, unless a request needs it now: big results do not travel through the scheduler.
    """

    wrap = staticmethod(b"".join)  # Dask serializes the result itself

    def __init__(self, worker: Any, topic: str, key: str, run: int) -> None:
        super().__init__(channel=None)
        self.worker = worker  # the Dask worker (``get_worker`` knows it only in the task's own thread)
        self.topic = topic
        self.key = key
        self.run = run
        self.sent = 0  # messages streamed so far
        self.tail_nested: list[Any] = []  # held back for the result (a big record, and everything after it)
        self.tail_items: list[Any] = []
        self.closed = False

    def wait_callback(self, rec: OpRecord) -> OpRecord:
        """Block this thread (only) until the driver says the callback is done."""
        done = self.request(StreamRequest.CALLBACK, rec.dumps())
        if done is None:
            raise _Abandoned()
        result: OpRecord = done
        return result

    def _flush_loop(self) -> None:
        while not self.closed:
            self.pending.wait()
            time.sleep(STREAM_FLUSH_SECONDS)
            self.pending.clear()
            if self.closed:
                return
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the worker lost its scheduler: the result still carries them
                return

    def _due(self) -> None:
        if time.monotonic() - self.last_send >= STREAM_FLUSH_SECONDS:
            self.flush()
        elif not self.pending.is_set():
            if self.flusher is None:
                self.flusher = threading.Thread(target=self._flush_loop, daemon=True, name="durable_mp-stream")
                self.flusher.start()
            self.pending.set()

    def flush(self) -> None:
        with self.send_lock:
            nested, items, _, _ = self._take()
            self.last_send = time.monotonic()
            if nested or items:
                self._stream(nested, items, StreamRequest.NONE, "")

    def _stream(self, nested: list[Any], items: list[Any], request: StreamRequest, reply: str,
                data: bytes = b"") -> None:
        """Send (under ``send_lock``), or hold back for the result once a message is too big for an event."""
        size = sum(len(entry[2]) for entry in nested) + sum(len(entry[3]) for entry in items)
        self.tail_nested += nested
        self.tail_items += items
        if request is StreamRequest.NONE and (size > STREAM_MAX_BYTES or len(self.tail_nested) + len(
                self.tail_items) > len(nested) + len(items)):
            return  # held: this and every later record travel with the result, in order
        message = [self.key, self.run, self.sent, [list(e) for e in self.tail_nested],
                   [list(e) for e in self.tail_items], request.value, reply, data]
        self.worker.log_event(self.topic, message)
        self.sent += 1
        self.tail_nested, self.tail_items = [], []

    def request(self, request: StreamRequest, data: bytes = b"") -> Any:
        """Stream what waits, ask the driver ``request`` and wait for its answer (a Dask ``Variable``)."""
        from distributed import Variable

        with self.send_lock:
            nested, items, _, _ = self._take()
            self.last_send = time.monotonic()
            reply = f"durable_mp-reply-{self.key}-{self.run}-{self.sent}"
            self._stream(nested, items, request, reply, data)
        # the worker's own client: branches of a nested batch run in threads of their own
        answer = Variable(reply, client=self.worker._get_client()).get(timeout=REPLY_TIMEOUT)
        return pickling.loads(answer)

    def sync(self) -> None:
        """An AT_MOST_ONCE step's STARTED record is committed by the driver before the step's body runs."""
        if not self.request(StreamRequest.SYNC):
            raise _Abandoned()

    def finish(self) -> tuple[list[Any], list[Any], int]:
        """The records not streamed yet (they travel with the result) and how many messages were streamed."""
        self.closed = True
        self.pending.set()
        with self.send_lock:
            nested, items, _, _ = self._take()
            return self.tail_nested + nested, self.tail_items + items, self.sent

    def chunk_done(self, unstarted: list[int], cpu_share: float, seconds: float = 0.0) -> None:
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


class _Abandoned(BaseException):
    """The driver no longer waits for this task (its batch ended, or it timed out): stop running branches."""


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


def run_topic(key: str) -> str:
    """The Dask event topic that counts the runs of one task (Dask runs a task again after losing its worker)."""
    return f"durable_mp-run-{key}"


def records_topic(execution_id: str) -> str:
    """The Dask event topic on which running chunks stream their records (and requests) to the driver."""
    return f"durable_mp-records-{execution_id}"


def _announce_start(execution_id: str) -> int:
    """Tell the driver (through the scheduler, and before any branch runs) that this task started; its run number.

    A round trip, not a buffered event: a branch that kills its worker at once must not
    take its announcement down with it.  The scheduler keeps the task's own run topic, so
    a run Dask started again after losing a worker knows it is one (and asks the driver
    for what the earlier runs recorded) without a round trip to the driver.
    """
    from distributed import get_worker
    from distributed.utils import sync

    worker = get_worker()
    key = str(worker.get_current_task())
    sync(worker.loop, worker.scheduler.log_event, topic=[start_topic(execution_id), run_topic(key)], msg=key)
    return len(sync(worker.loop, worker.scheduler.events, topic=run_topic(key)))


def run_chunk(payload: bytes, token: str, indices: list[int], names: dict | None, checkpoints: dict | None,
              settings: dict, budget: Budget = UNLIMITED) -> tuple[list, list, list[int], float, int, int]:
    """Dask task: run the branches ``indices`` of one batch in order, streaming their records.

    Returns the records not streamed, the unstarted branches, the task's own seconds, its
    run and how many messages it streamed.  ``budget`` is the chunk's start budget
    (``scheduling.start_budget``, counted within this chunk): no branch starts once the
    chunk's own outcomes would complete the batch.  A run Dask started again (it lost its
    worker) first asks the driver for what the earlier runs recorded: their finished
    branches are not run again, the others replay their checkpoints.
    """
    from distributed import get_worker

    started = time.monotonic()
    execution_id = settings["execution_id"]
    _forward_logs(settings.get(LOG_LEVEL_KEY, logging.WARNING))
    worker = get_worker()
    key = str(worker.get_current_task())
    try:
        run = _announce_start(execution_id)
    except Exception:  # noqa: BLE001 - the scheduler is away: run anyway (counted as never started, boundedly)
        run = 1
    outbox = _StreamingOutbox(worker, records_topic(execution_id), key, run)
    outcomes = [0, 0]  # [failures, successes] of this chunk
    if run > 1:
        earlier = outbox.request(StreamRequest.RERUN)
        if earlier is None:  # the driver no longer waits for this task
            return [], [], [], time.monotonic() - started, run, outbox.finish()[2]
        done, outcomes, fresh = earlier
        indices = [i for i in indices if i not in set(done)]
        checkpoints = {**(checkpoints or {}), **fresh}
    with _SOURCES_LOCK:
        source = _SOURCES.get(token)
        if source is None:
            source = _SOURCES[token] = load_source(payload, execution_id)
            while len(_SOURCES) > _SOURCE_CACHE_SIZE:
                _SOURCES.popitem(last=False)
    if names:
        source = copy.copy(source)
        source.names = names
    shared = WorkerShared(outbox, settings)
    empty: dict = {}
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
    except _Abandoned:
        unstarted = []
    finally:
        _CURRENT.index = None
    nested, items, sent = outbox.finish()
    return nested, items, unstarted, time.monotonic() - started, run, sent


def run_call(payload: bytes) -> Any:
    """Dask task: one attempt of a driver-level step that has a timeout."""
    from durable_mp.logger import Logger

    func, attempt, extra = pickling.loads(payload)
    return func(StepContext(Logger(extra=extra), attempt))


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
        self.client = client
        self.reconnect = reconnect  # a new client to the scheduler's address, once this one gave up
        self.address: str = getattr(getattr(client, "scheduler", None), "address", None) or ""
        self.resubscribe = False
        self.settings = {**settings, LOG_LEVEL_KEY: logging.getLogger(LOGGER_NAME).getEffectiveLevel()}
        self.log_events: deque[dict] = deque()  # ctx.logger records from the workers, re-emitted by the driver
        self.started: deque[str] = deque()  # keys of tasks that started on a worker, as announced
        self.streamed: deque[list] = deque()  # records (and requests) streamed by running chunks, as they came
        self.streams: dict[tuple[str, int], _DriverStream] = {}  # (task key, run) -> its messages, applied in order
        self.by_key: dict[str, Any] = {}  # task key -> its future
        self.replies: dict[str, list[str]] = {}  # task key -> the reply Variables it was sent (deleted at its end)
        self.wake = threading.Event()  # a future finished or a message was streamed
        self.fetching: dict[Any, float] = {}  # future -> since when its result is being fetched
        self.callback_waits: dict[tuple[str, str], OpRecord] = {}  # (task key, reply) -> the callback awaited
        self.starts: dict[str, int] = {}  # task key -> how often it started running
        self.queued_kills: dict[tuple[str, int], int] = {}  # KilledWorker of a branch that never announced a start
        self.cluster_wait = cluster_wait if cluster_wait is not None else configured_wait()
        self.futures: dict[Any, Task] = {}
        self.payload_futures: dict[str, Any] = {}
        self.isolate: set[tuple[str, int]] = set()  # branches of a chunk Dask gave up on: they run alone next
        self.nthreads = 0
        self.nthreads_at = -THREADS_REFRESH_SECONDS
        self.allowed_failures: int | None = None
        self.stalled_since: float | None = None  # since when the cluster could not run anything
        self.stall_reason = ""

    first_chunk_items = FIRST_CHUNK_ITEMS
    # skip_time on Dask: sleeps are instant, outcomes count as they arrive (the clock needs the
    # local pool's view of which workers run the batch)
    virtual_clock = False

    def run_batch(self, spec: Any) -> Any:
        self._subscribe()
        try:
            return super().run_batch(spec)
        finally:
            for topic in self._topics():
                try:
                    self.client.unsubscribe_topic(topic)
                except Exception:  # noqa: BLE001 - the client lost its scheduler
                    pass
            self._emit_logs()
            self.started.clear()

    def _topics(self) -> dict[str, deque]:
        return {log_topic(self.execution_id): self.log_events, start_topic(self.execution_id): self.started,
                records_topic(self.execution_id): self.streamed}

    def _subscribe(self) -> None:
        """Subscribe to the workers' events; again after a reconnect (a new scheduler knows no subscriptions)."""
        wake = self.wake
        for topic, events in self._topics().items():
            def handler(event: tuple, events: deque = events) -> None:
                events.append(event[1])
                wake.set()
            self.client.subscribe_topic(topic, handler)
        self.resubscribe = False

    # -- the stream ----------------------------------------------------------------------------
    def _read_stream(self) -> None:
        """Apply streamed messages in each run's order; answer the requests among them."""
        while self.streamed:
            message = self.streamed.popleft()
            key, run, seq = message[0], message[1], message[2]
            future = self.by_key.get(key)
            if future is None or self.futures.get(future) is None:  # the task ended, timed out or was closed
                if message[5]:
                    self._answer(key, message[6], None)
                continue
            stream = self.streams.setdefault((key, run), _DriverStream())
            for ready in stream.ready(seq, message):
                self._apply(self.futures[future], key, ready)

    def _apply(self, task: Task, key: str, message: list) -> None:
        _, _, _, nested, items, request, reply, data = message
        self.intake.stage_nested(nested)
        items = [item for item in items if item[0] not in task.reported]
        if items and task.batch is not None and not task.batch.closed:
            self.intake.finish_items(task, items)
        if not request:
            return
        self.store.flush()  # a request's records are committed before it is answered
        if StreamRequest(request) is StreamRequest.SYNC:
            self._answer(key, reply, True)
            return
        if StreamRequest(request) is StreamRequest.CALLBACK:
            self.callback_waits[(key, reply)] = OpRecord.loads(data)
            self._poll_dask_callbacks()
            return
        batch = task.batch  # RERUN: what the earlier runs recorded
        assert batch is not None
        done = sorted(task.reported)
        failed = sum(1 for i in done if batch.branches.state(i) is BranchState.FAILED)
        fresh = {i: self._branch_checkpoints(batch.spec, i) for i in task.unreported()}
        self.stats["reruns"] = self.stats.get("reruns", 0) + 1
        self._answer(key, reply, (done, [failed, len(done) - failed], fresh))

    def _answer(self, key: str, reply: str, value: Any) -> None:
        from distributed import Variable

        try:
            Variable(reply, client=self.client).set(pickling.dumps(value))
        except Exception:  # noqa: BLE001 - the scheduler went away: the task is lost with it
            return
        self.replies.setdefault(key, []).append(reply)

    def _poll_dask_callbacks(self) -> None:
        """Answer the branches that wait for a callback once it is done (``poll_callback`` reads the store)."""
        for (key, reply), rec in list(self.callback_waits.items()):
            if key not in self.by_key:
                del self.callback_waits[(key, reply)]
                continue
            assert self.poll_callback is not None, "a dispatcher that runs callbacks needs poll_callback"
            done = self.poll_callback(self.store, self.execution_id, rec)
            if done is not None:
                del self.callback_waits[(key, reply)]
                self._answer(key, reply, done)

    def _caught_up(self, future: Any, run: int, sent: int) -> bool:
        """Wait (boundedly) until every message a finished run streamed is applied: its result comes after them."""
        key = str(future.key)
        deadline = time.monotonic() + STREAM_CATCHUP_SECONDS
        while True:
            self._read_stream()
            stream = self.streams.get((key, run))
            if (stream.next if stream else 0) >= sent:
                return True
            if time.monotonic() > deadline:
                log.warning("Dask task %s finished, but %d of its %d streamed messages never came", key,
                            sent - (stream.next if stream else 0), sent)
                return False
            self.wake.wait(STREAM_POLL_SECONDS)
            self.wake.clear()

    def _forget(self, future: Any) -> None:
        """A task's end: drop its stream state and its reply Variables."""
        from distributed import Variable

        key = str(future.key)
        self.fetching.pop(future, None)
        self.starts.pop(key, None)
        self.by_key.pop(key, None)
        for stream_key in [k for k in self.streams if k[0] == key]:
            del self.streams[stream_key]
        for reply in self.replies.pop(key, []):
            try:
                Variable(reply, client=self.client).delete()
            except Exception:  # noqa: BLE001 - the scheduler went away, and its variables with it
                pass

    def _read_starts(self) -> None:
        """Tasks that said they started: count their runs; a timed chunk's ``branch_timeout`` runs from now."""
        if not self.started:
            return
        by_key = {str(future.key): task for future, task in self.futures.items()}
        while self.started:
            key = self.started.popleft()
            task = by_key.get(key)
            if task is None or task.batch is None:
                continue
            self.starts[key] = self.starts.get(key, 0) + 1
            timeout = task.batch.spec.branch_timeout
            if timeout and task.deadline is None:
                task.deadline = time.monotonic() + timeout

    def _emit_logs(self) -> None:
        events = self.log_events
        while events:
            record = logging.makeLogRecord(events.popleft())
            logging.getLogger(record.name).handle(record)

    # -- the cluster ---------------------------------------------------------------------------
    def _threads(self, refresh: bool = False) -> int:
        """Threads of the cluster's workers, asked of the scheduler at most every few seconds (0: none, or away)."""
        now = time.monotonic()
        if refresh or now - self.nthreads_at >= THREADS_REFRESH_SECONDS:
            self.nthreads_at = now
            try:
                self.nthreads = sum(self.client.nthreads().values()) if self._connected() else 0
            except Exception:  # noqa: BLE001 - the scheduler went away meanwhile
                self.nthreads = 0
        return self.nthreads

    def _connected(self) -> bool:
        return getattr(self.client, "status", "running") == "running"

    def _allowed_failures(self) -> int:
        """How many worker deaths a task survives on this cluster (the scheduler's setting, read once)."""
        if self.allowed_failures is None:
            try:
                self.allowed_failures = int(self.client.run_on_scheduler(_scheduler_allowed_failures))
            except Exception:  # noqa: BLE001 - the scheduler's own config is unreadable: Dask's default
                self.allowed_failures = DASK_DEFAULT_ALLOWED_FAILURES
        return self.allowed_failures

    def _unavailable(self, reason: str) -> None:
        """The cluster cannot run anything now: wait for it, up to ``cluster_wait`` seconds, then stop resumable."""
        now = time.monotonic()
        if self.stalled_since is None or reason != self.stall_reason:
            if self.stalled_since is None:
                self.stalled_since = now
            self.stall_reason = reason
            log.warning("%s; waiting up to %gs for it (Dask config %r), then the run stops, resumable",
                        reason, self.cluster_wait, CLUSTER_WAIT_KEY)
        self.resubscribe = True
        if now - self.stalled_since > self.cluster_wait:
            raise ClusterUnavailableError(
                f"{reason} for {now - self.stalled_since:.0f}s (limit {self.cluster_wait:g}s, Dask config "
                f"{CLUSTER_WAIT_KEY!r}); execution {self.execution_id!r} stays RUNNING: run it again to resume it")
        time.sleep(STALL_POLL_SECONDS)
        if getattr(self.client, "status", "running") in ("closed", "closing"):
            self._reconnect()

    def _reconnect(self) -> None:
        """The client gave up reconnecting (``distributed.comm.timeouts.connect``): try a new one, within our wait."""
        if self.reconnect is None or not self.address:
            raise ClusterUnavailableError(
                f"the Dask client gave up reconnecting to the scheduler (distributed.comm.timeouts.connect) and "
                f"cannot be replaced; execution {self.execution_id!r} stays RUNNING: run it again to resume it")
        try:
            client = self.reconnect(self.address)
        except (OSError, TimeoutError) as exc:
            log.debug("no scheduler at %s yet: %s", self.address, exc)
            return
        log.warning("connected a new Dask client to %s (the old one gave up reconnecting)", self.address)
        self.client = client
        self.payload_futures.clear()  # the old client's: gone with it
        self.resubscribe = True

    def _available(self) -> None:
        if self.stalled_since is not None:
            log.warning("the Dask cluster is back after %.0fs", time.monotonic() - self.stalled_since)
        self.stalled_since = None

    def _payload(self, batch: BatchRun) -> Any:
        """The batch's payload as a Dask task (recomputable from the graph), submitted again if it was lost."""
        payload = self.payload_futures.get(batch.token)
        if payload is None or payload.status in ("cancelled", "lost", "error"):
            payload = self.payload_futures[batch.token] = self.client.submit(
                load_payload, batch.payload, key=f"durable_mp-payload-{batch.token}-{uuid.uuid4().hex[:8]}",
                pure=False, priority=PAYLOAD_PRIORITY)
        return payload

    # -- scheduling ----------------------------------------------------------------------------
    def _fill(self, batch: BatchRun) -> None:
        if not batch.queue or not self._connected():
            return
        if self.resubscribe:
            self._subscribe()
        threads = self._threads()
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
            future = self.client.submit(run_chunk, self._payload(batch), batch.token, indices, names, checkpoints,
                                        self.settings, budget, pure=False)
            self.futures[future] = self._new_task(batch, indices, None)  # a deadline once it starts
            self.by_key[str(future.key)] = future
            future.add_done_callback(self._woken)
            running += 1

    def _pump(self, batch: BatchRun | None) -> None:
        if not self.futures:
            if batch is not None and batch.queue:  # nothing could be submitted
                self._unavailable("the Dask client is not connected to its scheduler" if not self._connected()
                                  else "the Dask cluster has no workers")
                self._threads(refresh=True)
                return
            raise RuntimeError("durable_mp internal error: nothing is running on Dask and nothing can start")
        done = self._wait(self._wait_seconds_dask())
        self._emit_logs()
        self._read_starts()
        self._read_stream()
        if self.callback_waits:
            self._poll_dask_callbacks()
        if done:
            for future in done:
                self._settle(future)
        else:
            self._check_stall()
        self._expire_deadlines()

    def _woken(self, _future: Any) -> None:
        self.wake.set()

    def _wait(self, timeout: float) -> list[Any]:
        """Until a future finishes or a message is streamed (a request waits for its answer), at most ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.wake.clear()
            done = [future for future in self.futures if future.done()]
            remaining = deadline - time.monotonic()
            if done or self.streamed or self.log_events or remaining <= 0:
                return done
            self.wake.wait(remaining)

    def _wait_seconds_dask(self) -> float:
        now = time.monotonic()
        waits = [STALL_POLL_SECONDS]
        if self.callback_waits:
            waits.append(CALLBACK_POLL_SECONDS)
        waits.extend(task.deadline - now for task in self.futures.values() if task.deadline is not None)
        if any(task.deadline is None and task.batch is not None and task.batch.spec.branch_timeout is not None
               for task in self.futures.values()):
            waits.append(START_POLL_SECONDS)  # a timed chunk's start is read soon after it is announced
        return max(0.0, min(waits))

    def _check_stall(self) -> None:
        """Nothing finished for a while: is the cluster still able to run the tasks?"""
        if not self._connected():
            self._unavailable("the Dask client lost its scheduler")
        elif not self._threads(refresh=True):
            self._unavailable("the Dask cluster has no workers")
        else:
            self._available()

    def _expire_deadlines(self) -> None:
        """``branch_timeout``: cancel the task and fail its branch (a running Dask thread is left to finish)."""
        now = time.monotonic()
        for future, task in list(self.futures.items()):
            if task.deadline is None or now < task.deadline or task.batch is None:
                continue
            del self.futures[future]
            self._forget(future)
            future.cancel()
            self.stats["timeouts"] += 1
            batch = task.batch
            for index in task.unreported():
                self.intake.fail_item(batch, index, StepTimeoutError(
                    f"branch {index} ({batch.spec.item_name(index)}) exceeded its timeout of "
                    f"{batch.spec.branch_timeout:g}s (the Dask backend cancelled its task)"), start=task.started)

    def _settle(self, future: Any) -> None:
        task = self.futures.get(future)
        runs = self.starts.get(str(future.key), 0)
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
            if isinstance(exc, TimeoutError) and time.monotonic() - first < self.cluster_wait:
                # a slow fetch, or its result was lost with a worker and Dask runs the task again (which may
                # ask the driver for what the lost run recorded): keep serving the stream meanwhile
                if not future.done():
                    future.add_done_callback(self._woken)
                return
            self.fetching.pop(future, None)
            self._read_stream()  # what the task streamed before it was lost is kept
            del self.futures[future]
            self._forget(future)
            self._lost(task, exc, runs)
            return
        self.fetching.pop(future, None)
        caught_up = self._caught_up(future, run, sent)
        del self.futures[future]
        self._forget(future)
        if not caught_up:
            self._lost(task, CancelledError("streamed records were lost"), runs)
            return
        self._available()
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
            deaths = max(1, min(runs, self._allowed_failures() + 1))
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

    def _close_batch(self, batch: BatchRun, *, record_started: bool) -> None:
        batch.closed = True
        for future, task in list(self.futures.items()):
            if task.batch is not batch:
                continue
            future.cancel()
            del self.futures[future]
            self._forget(future)
            if record_started:  # as on the local pool: the one that may be running stays STARTED
                self.intake.record_started(batch, task, task.unreported()[:1])
        self.isolate = {key for key in self.isolate if key[0] != batch.token}
        self.queued_kills = {key: n for key, n in self.queued_kills.items() if key[0] != batch.token}
        payload = self.payload_futures.pop(batch.token, None)
        if payload is not None:
            payload.release()

    def call(self, func: Callable, attempt: int, extra: dict, timeout: float | None) -> Any:
        data = pickling.dumps((func, attempt, extra))
        while True:
            while not self._connected() or not self._threads():
                self._unavailable("the Dask cluster cannot run the step (no scheduler, or no workers)")
                self._threads(refresh=True)
            future = self.client.submit(run_call, data, pure=False)
            try:
                return future.result(timeout=timeout)
            except TimeoutError as exc:
                future.cancel()
                raise StepTimeoutError(f"step exceeded its timeout of {timeout:g}s (the Dask backend cancelled "
                                       f"the task; a running Dask thread finishes unobserved)") from exc
            except Exception as exc:
                if fault_of(exc, 1) is not DaskFault.INFRASTRUCTURE:
                    raise
                log.warning("Dask task of a step ended with %s: %s; submitting it again", type(exc).__name__, exc)
                self._check_stall()


class _DriverStream:
    """The messages of one run of one task: applied in sequence order (the local pool's ``protocol.Sequence``)."""

    __slots__ = ("next", "waiting")

    def __init__(self) -> None:
        self.next = 0
        self.waiting: dict[int, list] = {}

    def ready(self, seq: int, message: list) -> list[list]:
        """``message`` arrived: the messages that can be applied now, in order."""
        if seq < self.next:
            return []
        self.waiting[seq] = message
        out = []
        while self.next in self.waiting:
            out.append(self.waiting.pop(self.next))
            self.next += 1
        return out


class DaskFault(Enum):
    """What ended a Dask task without its result, and so what it costs."""

    INFRASTRUCTURE = "infrastructure: back to the queue, uncharged"  # cancelled, lost, connection closed
    KILLED_CHUNK = "killed workers: its branches run again one by one, uncharged"
    KILLED_ALONE = "killed workers: charged to its one branch"
    KILLED_QUEUED = "Dask gave up on it, but it never ran: back to the queue, uncharged"
    TASK_ERROR = "the task itself failed"  # durable_mp's task code raised (the branches' own errors are records)


def fault_of(exc: BaseException, branches: int, runs: int = 1) -> DaskFault:
    """Sort an exception a chunk's future raised.

    ``branches``: how many of its branches did not report; ``runs``: how often the task
    announced it started.  ``KilledWorker`` of a task that never ran (it sat queued on
    workers that other tasks killed) is the others' fault: back to the queue, uncharged.
    """
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        if branches > 1:
            return DaskFault.KILLED_CHUNK
        return DaskFault.KILLED_ALONE if runs else DaskFault.KILLED_QUEUED
    if isinstance(exc, (CancelledError, OSError, TimeoutError)) or type(exc).__name__ in _INFRASTRUCTURE_NAMES:
        return DaskFault.INFRASTRUCTURE
    return DaskFault.TASK_ERROR


def configured_wait() -> float:
    """Seconds a run waits for an unavailable cluster: Dask config ``durable-mp.cluster-wait``."""
    import dask

    return float(dask.config.get(CLUSTER_WAIT_KEY, DEFAULT_CLUSTER_WAIT))


def _scheduler_allowed_failures() -> int:
    import dask

    return int(dask.config.get("distributed.scheduler.allowed-failures"))


def client_for(backend: Any) -> tuple[Any, bool]:
    """``(client, owned)`` for ``backend="dask"`` (new local cluster or $DASK_SCHEDULER_ADDRESS) or a Client."""
    from distributed import Client

    if isinstance(backend, Client):
        return backend, False
    return Client(), True


__all__ = ["DaskDispatcher", "DaskFault", "client_for", "fault_of", "load_payload", "run_chunk", "run_call"]
