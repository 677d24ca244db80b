"""The worker process: runs the branches the driver sends and streams their records back.

Two threads own the pipe.  The *reader* thread reads every message from the driver:
work (``RunChunk``, ``RunCall``, ``Quit``) goes to the main thread's inbox, a
``Reply`` wakes the request that carries its id, a ``StopBatch`` raises that batch's
stop flag.  So a request is never answered by a queued chunk, and a worker blocked on
a request still drains its inbound pipe (the driver can never block writing to it).
The main thread runs chunks; nested branches run on more threads and send through the
same lock-guarded ``Channel``.

A worker never touches the store.  Every record it produces goes into an ``Outbox``
that is sent at most every ``OUTBOX_FLUSH_SECONDS`` (and at the end of a chunk), so a
map over tiny items costs one message per few hundred items while a crash loses at most
a few milliseconds of finished work.  The index of the branch being run, and how far
into its chunk the worker got, are written into a shared-memory slot, so the driver
knows after a crash which branch was guilty, which bystanders in the same chunk may
have started (they run again with their checkpoints) and which never did.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from durable_mp.core.records import PICKLE_PROTOCOL, OpRecord, OpStatus, branch_key
from durable_mp.core.text import safe_str, type_name
from durable_mp.engine import result_blobs, wire
from durable_mp.engine.branch import SLEPT_KEY, BranchRunner, BranchSource
from durable_mp.engine.payload import load_source
from durable_mp.engine.protocol import (
    Budget,
    CallbackWait,
    CallResult,
    ChunkDone,
    ProtocolError,
    Quit,
    Records,
    Reply,
    RunCall,
    RunChunk,
    StopBatch,
    Succeeded,
    SyncRequest,
    WatchEnd,
    WatchStart,
)
from durable_mp.engine.scheduling import stop_thresholds
from durable_mp.engine.worker_process import ForwardHandler, default_signals, die_with_parent
from durable_mp.engine.worker_state import IDLE, PROGRESS_SHIFT, SLOT_FORMAT, WorkerContextState, WorkerShared
from durable_mp.exceptions import OrphanedChildException, SerDesError
from durable_mp.lambda_service import ErrorObject
from durable_mp.logger import Logger

OUTBOX_FLUSH_SECONDS = 0.005
_monotonic = time.monotonic
PAYLOAD_CACHE_SIZE = 4
SUCCEEDED = OpStatus.SUCCEEDED


class DriverGone(Exception):
    """The pipe to the driver closed: the worker exits."""


class Channel:
    """Worker end of the pipe: sends under a lock, requests answered by id through the reader thread."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.seq = 0  # number of the last message sent (``protocol.Sequence`` checks them in the driver)
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.stopped: set[str] = set()  # batch tokens the driver stopped (StopBatch)
        self._ids = itertools.count(1)
        self._waiting: dict[int, list[Any]] = {}  # request id -> [event, reply]
        self._waiting_lock = threading.Lock()
        self._gone = False

    def send(self, msg: Any, gathered: bool = False) -> None:
        """Send ``msg`` numbered after the last one: the number and the pipe's order are one."""
        result_blobs.before_send()  # the large results it refers to are durable first
        with self.lock:
            self.seq += 1
            wire.send(self.conn, msg._replace(seq=self.seq), gathered=gathered)

    def post(self, build: Callable[[int], Any], gathered: bool = True) -> list[Any]:
        """Send request ``build(request_id)``; ``wait`` on what this returns for the driver's reply."""
        request_id = next(self._ids)
        slot: list[Any] = [threading.Event(), None]
        with self._waiting_lock:
            if self._gone:
                raise DriverGone("the driver is gone")
            self._waiting[request_id] = slot
        self.send(build(request_id), gathered)
        return slot

    @staticmethod
    def wait(slot: list[Any]) -> Any:
        slot[0].wait()
        if slot[1] is None:
            raise DriverGone("the driver went away before replying")
        return slot[1].value

    def request(self, build: Callable[[int], Any], gathered: bool = True) -> Any:
        """Send ``build(request_id)`` and wait for the driver's reply to that id."""
        return self.wait(self.post(build, gathered))

    def read_forever(self) -> None:
        """The reader thread: route every message from the driver."""
        try:
            while True:
                msg = wire.recv(self.conn)
                match msg:
                    case Reply():
                        with self._waiting_lock:
                            slot = self._waiting.pop(msg.request_id, None)
                        if slot is not None:
                            slot[1] = msg
                            slot[0].set()
                    case StopBatch():
                        self.stopped.add(msg.token)
                    case _:
                        self.inbox.put(msg)
        except (EOFError, OSError):
            pass
        finally:
            with self._waiting_lock:
                self._gone = True
                for slot in self._waiting.values():
                    slot[0].set()
                self._waiting.clear()
            self.inbox.put(None)


class Outbox:
    """Records on their way to the driver, batched by time.

    A record waits at most ``OUTBOX_FLUSH_SECONDS``: ``add`` sends when the last message
    is older than that, and otherwise wakes a flusher thread that sends after the
    interval, so a step that finishes just before a long computation is not held back.
    ``send_lock`` is held from taking the waiting records until their message is sent, by
    every sender (flush, sync, chunk end, the flusher thread): records reach the driver in
    the order they were produced, so an older record can never overwrite a newer one.
    """

    # a record's buffers: joined, or a frame of their own when large.  They are never the user's
    # memory: results are copied where they are serialized (``branch.run_branch``), steps and
    # child contexts serialize to bytes
    wrap = staticmethod(wire.big)

    def __init__(self, channel: Channel | None) -> None:
        self.channel = channel
        self.lock = threading.Lock()
        self.send_lock = threading.RLock()
        self.nested: list[tuple[str, str, Any]] = []
        self.items: list[tuple[int, bool, str, Any]] = []
        self.succeeded = Succeeded([], [], [])  # plain successes, as columns
        self.gathered = False  # some waiting record is a wire.Gather (large: its own frame)
        self.task_id = 0
        self.last_send = time.monotonic()
        self.pending = threading.Event()
        self.flusher: threading.Thread | None = None
        self._watch_ids = itertools.count(1)

    def add(self, rec: OpRecord) -> None:
        data = self.wrap(rec.dumps_parts())
        with self.lock:
            self.nested.append((rec.parent_id, rec.op_id, data))
            self.gathered = self.gathered or data.__class__ is wire.Gather
        self._due()

    def add_item(self, index: int, rec: OpRecord) -> None:
        """A branch's terminal record, pickled here so the driver stores the bytes as they are."""
        data = self.wrap(rec.dumps_parts())
        with self.lock:
            self.items.append((index, rec.status == SUCCEEDED, branch_key(index), data))
            self.gathered = self.gathered or data.__class__ is wire.Gather
        self._due()

    def add_succeeded(self, index: int, data: bytes, value: Any) -> None:
        """A plain success as compact record bytes (``branch.BranchRunner``), and its value.

        Called only by the thread that runs the chunk, without ``lock`` (a third of this call's
        cost): each ``append`` is atomic, ``values`` is appended last, and ``_take`` cuts
        exactly as many items off the front of each column as ``values`` held when it looked.
        """
        succeeded = self.succeeded
        succeeded.indices.append(index)
        succeeded.records.append(data)
        succeeded.values.append(value)  # last: an item is complete once its value is in
        if _monotonic() - self.last_send >= OUTBOX_FLUSH_SECONDS:
            self.flush()
        elif not self.pending.is_set():
            self._due()

    def _due(self) -> None:
        if time.monotonic() - self.last_send >= OUTBOX_FLUSH_SECONDS:
            self.flush()
        elif not self.pending.is_set():
            if self.flusher is None:
                self.flusher = threading.Thread(target=self._flush_loop, daemon=True, name="durable_mp-outbox")
                self.flusher.start()
            self.pending.set()

    def _flush_loop(self) -> None:
        while True:
            self.pending.wait()
            time.sleep(OUTBOX_FLUSH_SECONDS)
            self.pending.clear()
            try:
                self.flush()
            except OSError:  # the driver is gone; the worker is about to exit
                return

    def _take(self) -> tuple[list[Any], list[Any], Succeeded | None, bool]:
        """The waiting records (callers hold ``send_lock``, so one taker at a time)."""
        with self.lock:
            taken = self.nested, self.items, _cut(self.succeeded), self.gathered
            self.nested, self.items, self.gathered = [], [], False
        return taken

    def flush(self) -> None:
        """Send the waiting records, if any."""
        with self.send_lock:
            nested, items, succeeded, gathered = self._take()
            self.last_send = time.monotonic()
            if nested or items or succeeded:
                self._send(Records(self.task_id, nested, items, succeeded), gathered)

    def chunk_done(self, unstarted: list[int], cpu_share: float, seconds: float = 0.0) -> None:
        with self.send_lock:
            nested, items, succeeded, gathered = self._take()
            self.last_send = time.monotonic()
            self._send(ChunkDone(self.task_id, nested, items, unstarted, cpu_share, succeeded, seconds), gathered)

    def _send(self, msg: Any, gathered: bool) -> None:
        assert self.channel is not None
        self.channel.send(msg, gathered)

    def sync(self) -> None:
        """Send everything and wait until the driver has committed it.

        Sent under ``send_lock`` (issue 18 defect 2: sent after releasing it, a newer record
        taken by another thread could overtake these); only the wait is outside it.
        """
        channel = self.channel
        assert channel is not None
        with self.send_lock:
            nested, items, succeeded, _ = self._take()
            task_id = self.task_id
            self.last_send = time.monotonic()
            reply = channel.post(lambda rid: SyncRequest(rid, task_id, nested, items, succeeded))
        channel.wait(reply)

    def watch_start(self, rec: OpRecord, timeout: float | None) -> int:
        """Tell the driver a watched step starts; returns the watch's id."""
        watch_id = next(self._watch_ids)
        self.flush()
        assert self.channel is not None
        self.channel.send(WatchStart(self.task_id, watch_id, rec, timeout))
        return watch_id

    def watch_end(self, watch_id: int) -> None:
        assert self.channel is not None
        self.channel.send(WatchEnd(self.task_id, watch_id))

    def wait_callback(self, rec: OpRecord) -> OpRecord:
        """Block this thread (only) until the driver says the callback is done."""
        self.flush()
        assert self.channel is not None
        task_id = self.task_id
        reply: OpRecord = self.channel.request(lambda rid: CallbackWait(rid, task_id, rec), gathered=False)
        return reply


def _cut(columns: Succeeded) -> Succeeded | None:
    """The complete items at the front of ``columns``, removed from it (None if there are none).

    ``add_succeeded`` appends to the three lists without a lock while this runs: ``values``
    gets an item last, so its length counts the items complete in all three, and only that
    many are sliced and deleted (each list operation is atomic), whatever is appended meanwhile.
    """
    n = len(columns.values)
    if not n:
        return None
    indices, records, values = columns
    taken = Succeeded(indices[:n], records[:n], values[:n])
    del indices[:n], records[:n], values[:n]
    return taken


def worker_main(conn: Any, slot: Any, parent_pid: int, settings: dict[str, Any]) -> None:
    """Serve chunks until told to quit or the driver goes away."""
    default_signals()
    die_with_parent(parent_pid)
    channel = Channel(conn)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    current = memoryview(slot).cast(SLOT_FORMAT)
    root.addHandler(ForwardHandler(channel, current))
    outbox = Outbox(channel)
    shared = WorkerShared(outbox, settings, current)
    result_blobs.configure(settings)  # large results go to the store's directory, not the pipe
    cache: OrderedDict[str, tuple[BranchSource, list[int]]] = OrderedDict()
    threading.Thread(target=channel.read_forever, daemon=True, name="durable_mp-reader").start()
    while True:
        msg = channel.inbox.get()
        match msg:
            case None | Quit():
                return
            case RunChunk():
                _run_chunk(msg, shared, outbox, cache, current, channel.stopped)
            case RunCall():
                _run_call(msg, channel, current)
            case _:  # the worker dies of it: the driver sees a death, never a silently dropped task
                raise ProtocolError(f"the driver sent a {type(msg).__name__}, which a worker has no use for")


def _run_chunk(msg: RunChunk, shared: WorkerShared, outbox: Outbox,
               cache: OrderedDict[str, tuple[BranchSource, list[int]]], current: Any, stopped: set[str]) -> None:
    """Run a chunk's branches in order; ``cache`` holds, per batch token, its source and the
    [failures, successes] this worker produced for the batch (what its budgets count)."""
    cached = cache.get(msg.token)
    if cached is None:
        cached = cache[msg.token] = (load_source(msg.payload, shared.execution_id), [0, 0])
        while len(cache) > PAYLOAD_CACHE_SIZE:
            cache.popitem(last=False)
    source, outcomes = cached
    if msg.names:
        source.names = msg.names
    outbox.task_id = msg.task_id
    checkpoints = msg.checkpoints
    budget: Budget = msg.budget
    fail_stop, success_stop = stop_thresholds(budget)  # ``stop_chunk`` as two comparisons per item
    empty: dict[str, OpRecord] = {}
    wall, cpu = time.monotonic(), time.process_time()
    indices = msg.indices
    unstarted: list[int] = []
    fresh = WorkerContextState(shared, empty)  # a branch without checkpoints only reads an empty dict
    runner = BranchRunner(source, fresh.context, compact=True)
    fresh_context = runner.make_context
    run = runner.run
    add_succeeded = outbox.add_succeeded
    token = msg.token
    progress = msg.task_id << PROGRESS_SHIFT
    for position, index in enumerate(indices):
        if outcomes[1] >= success_stop or outcomes[0] >= fail_stop or token in stopped:
            unstarted = list(indices[position:])
            break
        current[0] = index
        current[1] = progress + position + 1
        if checkpoints:
            ckpt = checkpoints.get(index)
            if ckpt:
                runner.make_context = WorkerContextState(shared, ckpt).context
            elif runner.make_context is not fresh_context:
                runner.make_context = fresh_context
        rec, value = run(index)
        if rec.__class__ is bytes:  # a plain success
            add_succeeded(index, rec, value)
            outcomes[1] += 1
        else:
            outbox.add_item(index, rec)
            outcomes[rec.status == SUCCEEDED] += 1  # [0]: failures, [1]: successes
            if rec.extra and SLEPT_KEY in rec.extra:
                # skip_time: the next branch would start before this one's skipped sleep ended
                # (engine.virtual_clock); the driver starts it when the slot frees
                unstarted = list(indices[position + 1:])
                break
    current[0] = IDLE
    # share of a core the chunk used: tells the driver whether the batch is CPU-bound
    took = max(time.monotonic() - wall, 1e-6)
    outbox.chunk_done(unstarted, (time.process_time() - cpu) / took, took)


def _run_call(msg: RunCall, channel: Channel, current: Any) -> None:
    """One attempt of a driver-level step that needs a killable process (it has a timeout).

    The slot says the step began once its function is loaded: unpickling it may import the
    user's modules in a fresh worker, which is the worker getting ready, not the step running.
    """
    try:
        from durable_mp.types import StepContext  # a driver-level step only: not at the worker's start

        func, attempt, extra = pickle.loads(msg.payload)  # a cloudpickle stream loads with pickle
        current[1] = (msg.task_id << PROGRESS_SHIFT) + 1  # begun: the driver's timeout counts from here
        value = func(StepContext(Logger(extra=extra), attempt))
        data = _pickle_result(value, extra)
        channel.send(CallResult(msg.task_id, True, data))
    except OrphanedChildException:  # a KeyboardInterrupt here is the step's own (SIGINT kills a worker): it travels
        raise
    except BaseException as exc:  # noqa: BLE001
        try:
            failure: Any = pickle.dumps(exc, protocol=PICKLE_PROTOCOL)
            pickle.loads(failure)
        except Exception:  # noqa: BLE001 - an exception that does not survive pickling travels as text
            failure = (ErrorObject.from_exception(exc).to_dict(), type(exc).__name__)
        channel.send(CallResult(msg.task_id, False, failure))


def _pickle_result(value: Any, extra: dict[str, Any]) -> bytes:
    """The step's return value as bytes for the driver, or a ``SerDesError`` that says it is the result.

    The driver serializes the value again with the step's serdes; this pickle only carries
    it over the pipe, so a value it refuses is refused as the step's serdes would refuse it.
    """
    try:
        try:
            return pickle.dumps(value, protocol=PICKLE_PROTOCOL)
        except Exception:  # noqa: BLE001 - lambdas, closures: by value
            import cloudpickle  # only now: a worker imports it when a value needs it (start time)

            data: bytes = cloudpickle.dumps(value, protocol=PICKLE_PROTOCOL)
            return data
    except Exception as error:
        name = extra.get("operationName")
        what = f"result of step {name!r}" if name else "result of the step"
        raise SerDesError(f"Cannot serialize {what} (value of type {type_name(value)}) to send it from the worker "
                          f"to the driver: {type(error).__name__}: {safe_str(error)}") from error
