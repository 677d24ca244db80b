"""What runs inside a Dask task: a chunk of branches, a timed step, a batch's payload.

Dask pickles task functions by reference (module and name), so everything a worker runs
lives at module level here, apart from the driver (``backends.dask``), which a worker
never needs to import.  A running chunk streams its records to the driver as Dask events
(``_StreamingOutbox``), asks it through a Dask ``Variable`` when it must wait for an
answer (``StreamRequest``), hands big records off as Dask keys, tells the driver when a step
with a timeout starts and ends (the driver restarts the worker of one that runs over), and
forwards ``ctx.logger`` records as events.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import uuid
from collections import OrderedDict
from enum import Enum
from typing import Any

from durable_mp.backends.dask_logs import CURRENT, forward_logs, log_topic
from durable_mp.core.records import OpRecord, OpStatus, branch_key
from durable_mp.engine import pickling
from durable_mp.engine.branch import run_branch
from durable_mp.engine.payload import load_source
from durable_mp.engine.protocol import UNLIMITED, Budget
from durable_mp.engine.scheduling import stop_chunk
from durable_mp.engine.worker import Outbox
from durable_mp.engine.worker_state import WorkerContextState, WorkerShared
from durable_mp.types import StepContext

LOG_LEVEL_KEY = "dask_log_level"  # in the settings: the driver's level for ctx.logger
STREAM_FLUSH_SECONDS = 0.02  # a record waits at most this long on the worker before it is streamed
STREAM_MAX_BYTES = 256 * 1024  # larger records are handed off, not sent through the scheduler
REPLY_TIMEOUT = 3600.0  # a worker waits this long for the driver's answer to a request
PAYLOAD_WAIT_SECONDS = 1.0  # a chunk waits this long for its batch's payload before it frees its thread
_SOURCES: OrderedDict = OrderedDict()
_SOURCES_LOCK = threading.Lock()
_SOURCE_CACHE_SIZE = 4


class StreamRequest(str, Enum):
    """What a streamed message asks of the driver, which answers through a Dask ``Variable``."""

    NONE = ""
    SYNC = "sync"  # commit everything streamed so far (an AT_MOST_ONCE step's STARTED record), then reply
    RERUN = "rerun"  # Dask runs this task again (it lost its worker): reply with what the earlier runs recorded
    CALLBACK = "callback"  # reply with the callback's record once it is done (completed, failed or timed out)
    HAND_OFF = "hand-off"  # big records wait as a Dask key on this worker: fetch them, then reply
    WATCH = "watch"  # a step with a timeout starts (no reply: the driver restarts the worker if it runs over)
    WATCH_END = "watch-end"  # that step ended (no reply)
    END = "end"  # the run's last message: the branches it did not start (no reply)


def _join(parts: list[Any]) -> Any:
    return b"".join(parts)


def _size(nested: list[Any], items: list[Any]) -> int:
    return sum(len(entry[2]) for entry in nested) + sum(len(entry[3]) for entry in items)


class _StreamingOutbox(Outbox):
    """Streams a chunk's records to the driver as Dask events while it runs.

    Every message names its task's key, its run (Dask may run a task again) and a sequence
    number, so the driver applies one run's messages in the order they were produced
    (``dask_stream._RunOrder``), as it does a local worker's pipe.  Records larger than
    ``STREAM_MAX_BYTES`` (big results) do not travel through the scheduler: they are
    handed off (``_hand_off``), and the branch that made them waits until the driver has
    them, so a lost worker never costs a finished branch; the last records leave in a
    confirmed round trip before the task ends (``finish``).  Only if a hand-off fails
    (the scheduler is away) do they, and all later records, wait for the task's result.
    """

    wrap = staticmethod(_join)  # Dask serializes the result itself

    def __init__(self, worker: Any, topic: str, key: str, run: int) -> None:
        super().__init__(channel=None)
        self.worker = worker  # the Dask worker (``get_worker`` knows it only in the task's own thread)
        self.topic = topic
        self.key = key
        self.run = run
        self.sent = 0  # messages streamed so far
        self.tail_nested: list[Any] = []  # held back for the result (once a hand-off failed)
        self.tail_items: list[Any] = []
        self.held = False  # a hand-off failed: records wait for the result (or the next request)
        self.closed = False

    def add(self, rec: OpRecord) -> None:
        data = self.wrap(rec.dumps_parts())
        with self.lock:
            self.nested.append((rec.parent_id, rec.op_id, data))
        self._added(data)

    def add_item(self, index: int, rec: OpRecord) -> None:
        data = self.wrap(rec.dumps_parts())
        with self.lock:
            self.items.append((index, rec.status == OpStatus.SUCCEEDED, branch_key(index), data))
        self._added(data)

    def _added(self, data: bytes) -> None:
        if len(data) > STREAM_MAX_BYTES:
            self.flush()  # handed off before its branch goes on (or waits for another thread's hand-off of it)
        else:
            self._due()

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
        """Send (under ``send_lock``): big records by hand-off, the rest (and a request) as an event."""
        if not self.held and _size(nested, items) > STREAM_MAX_BYTES:
            if self._hand_off(nested, items):
                nested, items = [], []
            else:
                self.held = True
        self.tail_nested += nested
        self.tail_items += items
        if request is StreamRequest.NONE and (self.held or not (self.tail_nested or self.tail_items)):
            return  # held: these and every later record travel with the result (or the next request), in order
        self._event(request, reply, data)

    def _event(self, request: StreamRequest, reply: str, data: bytes | str = b"", confirmed: bool = False) -> None:
        """Send what is held, and ``request``, as the run's next message (``confirmed``: wait for the scheduler)."""
        message = [self.key, self.run, self.sent, [list(e) for e in self.tail_nested],
                   [list(e) for e in self.tail_items], request.value, reply, data]
        if confirmed:
            from distributed.utils import sync

            sync(self.worker.loop, self.worker.scheduler.log_event, topic=self.topic, msg=message)
        else:
            self.worker.log_event(self.topic, message)
        self.sent += 1
        self.tail_nested, self.tail_items = [], []
        self.held = False

    def _hand_off(self, nested: list[Any], items: list[Any]) -> bool:
        """Put big records in this worker's memory as a Dask key and wait until the driver fetched them.

        Under ``send_lock``, so no later record overtakes them and no branch goes on before
        the driver has them.  False (nothing sent) if they could not be handed off.
        """
        from distributed import Variable

        client = self.worker._get_client()
        data_key = f"durable_mp-records-{self.key}-{self.run}-{self.sent}"
        reply = f"durable_mp-reply-{self.key}-{self.run}-{self.sent}"
        try:
            future = client.scatter({data_key: [[list(e) for e in nested], [list(e) for e in items]]},
                                    workers=[self.worker.address], direct=True, hash=False)[data_key]
            Variable(data_key, client=client).set(future)  # how Dask passes a future to another client
        except Exception:  # noqa: BLE001 - the scheduler is away: the records wait for the result
            return False
        try:
            self._event(StreamRequest.HAND_OFF, reply, data_key)
            fetched = pickling.loads(Variable(reply, client=client).get(timeout=REPLY_TIMEOUT))
        finally:
            future.release()
        if fetched is None:  # the driver no longer waits for this task
            raise _Abandoned()
        return bool(fetched)

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

    def finish(self, unstarted: list[int]) -> tuple[list[Any], list[Any], list[int], int]:
        """End the run: the records and unstarted branches not streamed, and how many messages were.

        The last records, and the branches the chunk did not start, go to the scheduler in
        a round trip before the task ends (an ``END`` message), not with its result: a worker
        killed once the task has ended (by the next task, say) costs none of its branches,
        and the driver, reading them in order, never takes an unstarted branch for a running
        one.  Only if that fails (or a hand-off did) do they travel with the result.
        """
        self.closed = True
        self.pending.set()
        with self.send_lock:
            nested, items, _, _ = self._take()
            self.tail_nested += nested
            self.tail_items += items
            if not self.held and (self.tail_nested or self.tail_items or unstarted):
                try:
                    self._event(StreamRequest.END, "", pickling.dumps(unstarted), confirmed=True)
                    unstarted = []
                except Exception:  # noqa: BLE001 - the scheduler is away: they travel with the result
                    pass
            return self.tail_nested, self.tail_items, unstarted, self.sent

    def chunk_done(self, unstarted: list[int], cpu_share: float, seconds: float = 0.0) -> None:
        return None

    def watch_start(self, rec: OpRecord, timeout: float | None) -> int:
        """A step with a timeout starts: the driver restarts this worker if it outlives it (after what waits)."""
        if not timeout:
            return 0
        watch_id = next(self._watch_ids)
        self._notify(StreamRequest.WATCH, pickling.dumps((watch_id, rec.dumps(), timeout)))
        return watch_id

    def watch_end(self, watch_id: int) -> None:
        if watch_id:
            self._notify(StreamRequest.WATCH_END, pickling.dumps(watch_id))

    def _notify(self, kind: StreamRequest, data: bytes) -> None:
        """Stream what waits and a notice the driver does not answer."""
        with self.send_lock:
            nested, items, _, _ = self._take()
            self.last_send = time.monotonic()
            self._stream(nested, items, kind, "", data)


class _Abandoned(BaseException):
    """The driver no longer waits for this task (its batch ended, or it timed out): stop running branches."""


def load_payload(payload: bytes) -> bytes:
    """Dask task holding a batch's code and items: its input is in the graph, so Dask can run it again."""
    return payload


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
    for what the earlier runs recorded) without a round trip to the driver.  The
    announcement and the read of the earlier runs go out together (one round trip's
    wait): this run tells its own entry apart by a token.
    """
    import asyncio

    from distributed import get_worker
    from distributed.utils import sync

    worker = get_worker()
    key = str(worker.get_current_task())
    token = uuid.uuid4().hex

    async def announce_and_count() -> list:
        _, runs = await asyncio.gather(
            worker.scheduler.log_event(topic=[start_topic(execution_id), run_topic(key)],
                                       msg=[key, worker.address, token]),
            worker.scheduler.events(topic=run_topic(key)))
        return list(runs)

    earlier = [msg for _, msg in sync(worker.loop, announce_and_count) if msg[2] != token]
    return len(earlier) + 1


def payload_variable(token: str) -> str:
    """The Dask ``Variable`` through which chunks of batch ``token`` find its payload task's future."""
    return f"durable_mp-payload-{token}"


def _source(token: str, execution_id: str) -> Any:
    """The batch's code and items, loaded once per worker (the payload task's result, fetched on first use).

    Chunks do not depend on the payload task in the graph: Dask would place every chunk
    where the payload lies, and balance the others by stealing.
    """
    with _SOURCES_LOCK:
        source = _SOURCES.get(token)
    if source is not None:
        return source
    from distributed import Variable, get_worker, rejoin, secede

    payload = Variable(payload_variable(token), client=get_worker()._get_client()).get(timeout=REPLY_TIMEOUT)
    try:
        data = payload.result(timeout=PAYLOAD_WAIT_SECONDS)
    except TimeoutError:  # being (re)computed, perhaps queued behind this very task: free its thread meanwhile
        secede()
        try:
            data = payload.result(timeout=REPLY_TIMEOUT)
        finally:
            rejoin()
    loaded = load_source(data, execution_id)
    with _SOURCES_LOCK:
        source = _SOURCES.setdefault(token, loaded)
        while len(_SOURCES) > _SOURCE_CACHE_SIZE:
            _SOURCES.popitem(last=False)
    return source


def run_chunk(token: str, indices: list[int], names: dict | None, checkpoints: dict | None,
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
    forward_logs(settings.get(LOG_LEVEL_KEY, logging.WARNING))
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
            return [], [], [], time.monotonic() - started, run, outbox.finish([])[3]
        done, outcomes, fresh = earlier
        indices = [i for i in indices if i not in set(done)]
        checkpoints = {**(checkpoints or {}), **fresh}
    source = _source(token, execution_id)
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
            CURRENT.index = index
            state = WorkerContextState(shared, checkpoints.get(index, empty) if checkpoints else empty)
            rec = run_branch(source, index, state.context)
            outbox.add_item(index, rec)
            outcomes[rec.status == OpStatus.SUCCEEDED] += 1
    except _Abandoned:
        unstarted = []
    finally:
        CURRENT.index = None
    nested, items, unstarted, sent = outbox.finish(unstarted)
    return nested, items, unstarted, time.monotonic() - started, run, sent


def run_call(payload: bytes) -> Any:
    """Dask task: one attempt of a driver-level step that has a timeout."""
    from durable_mp.logger import Logger

    func, attempt, extra = pickling.loads(payload)
    return func(StepContext(Logger(extra=extra), attempt))


__all__ = ["LOG_LEVEL_KEY", "StreamRequest", "load_payload", "log_topic", "records_topic", "payload_variable",
           "run_call", "run_chunk", "start_topic"]
