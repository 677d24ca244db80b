"""The worker process: runs the branches the driver sends and streams their records back.

A worker never touches the store.  Every record it produces goes into an ``Outbox``
that is sent to the driver at most every ``OUTBOX_FLUSH_SECONDS`` (and at the end of a
task), so a map over tiny items costs one pipe message per few hundred items while a
crash loses at most a few milliseconds of finished work.  The index of the branch being
run is written into a shared-memory slot so the driver knows, after a crash, which
branch was guilty and which were innocent bystanders in the same chunk.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import threading
import time
from collections import OrderedDict
from typing import Any

import cloudpickle

from durable_mp.engine import wire
from durable_mp.engine.branch import BranchSource, run_branch
from durable_mp.context import DurableContext
from durable_mp.engine.payload import load_source
from durable_mp.exceptions import OrphanedChildException
from durable_mp.lambda_service import ErrorObject
from durable_mp.logger import Logger
from durable_mp.core.records import PICKLE_PROTOCOL, OpRecord, OpStatus, branch_key, operation_id

SUCCEEDED = OpStatus.SUCCEEDED
from durable_mp.engine.state import ExecutionState
from durable_mp.engine.threads import run_batch_in_threads
from durable_mp.types import StepContext

OUTBOX_FLUSH_SECONDS = 0.005
PAYLOAD_CACHE_SIZE = 4
PARENT_CHECK_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1
SLOT_FORMAT = "q"
IDLE = -1


class Channel:
    """Worker end of the pipe; a lock because nested branches send from threads."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, msg: tuple, gathered: bool = False) -> None:
        with self.lock:
            wire.send(self.conn, msg, gathered=gathered)

    def request(self, msg: tuple) -> Any:
        with self.lock:
            wire.send(self.conn, msg, gathered=True)
            return wire.recv(self.conn)


class Outbox:
    """Records on their way to the driver, batched by time.

    A record waits at most ``OUTBOX_FLUSH_SECONDS``: ``add`` sends when the last message
    is older than that, and otherwise wakes a flusher thread that sends after the
    interval, so a step that finishes just before a long computation is not held back.
    ``send_lock`` keeps messages of one task in order ("R" ... "D").
    """

    wrap = staticmethod(wire.big)  # a record's buffers: joined, or a frame of their own when large

    def __init__(self, channel: Channel | None) -> None:
        self.channel = channel
        self.lock = threading.Lock()
        self.send_lock = threading.RLock()
        self.nested: list[tuple[str, str, bytes]] = []  # (parent_id, op_id, record bytes)
        self.items: list[tuple[int, bool, str, bytes]] = []  # (index, succeeded, key, record bytes)
        self.gathered = False  # some waiting record is a wire.Gather (large: its own frame)
        self.task_id = 0
        self.last_send = time.monotonic()
        self.pending = threading.Event()
        self.flusher: threading.Thread | None = None

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

    def _due(self) -> None:
        if time.monotonic() - self.last_send >= OUTBOX_FLUSH_SECONDS:
            self.send("R")
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
                self.send("R")
            except OSError:  # the driver is gone; the worker is about to exit
                return

    def _take(self) -> tuple[list, list, bool]:
        """The records waiting, and whether any of them travels as its own frame."""
        with self.lock:
            taken = self.nested, self.items, self.gathered
            self.nested, self.items, self.gathered = [], [], False
        return taken

    def send(self, kind: str, *extra: Any) -> None:
        with self.send_lock:
            nested, items, gathered = self._take()
            self.last_send = time.monotonic()
            if kind == "R" and not nested and not items:
                return
            self.channel.send((kind, self.task_id, nested, items, *extra), gathered)

    def sync(self) -> None:
        """Send everything and wait until the driver has committed it."""
        with self.send_lock:
            nested, items, _gathered = self._take()
            self.channel.request(("S", self.task_id, nested, items))

    def watch(self, rec: OpRecord | None, timeout: float | None) -> None:
        """Tell the driver a watched step starts (``rec``) or ends (None)."""
        with self.send_lock:
            self.send("R")
            self.channel.send(("W", self.task_id, rec, timeout))


class WorkerShared:
    """Per-process settings every branch state refers to."""

    def __init__(self, outbox: Outbox, settings: dict) -> None:
        self.outbox = outbox
        self.execution_id = settings["execution_id"]
        self.skip_time = settings.get("skip_time", False)
        self.watch_steps = settings.get("watch_steps", False)


class WorkerState(ExecutionState):
    """The state behind a ``DurableContext`` inside a worker: checkpoints in, records out."""

    __slots__ = ("shared", "checkpoints", "cancelled")

    def __init__(self, shared: WorkerShared, checkpoints: dict[str, OpRecord]) -> None:
        self.shared = shared
        self.checkpoints = checkpoints
        self.cancelled = False

    @property
    def execution_id(self) -> str:
        return self.shared.execution_id

    @property
    def skip_time(self) -> bool:
        return self.shared.skip_time

    @property
    def watch_steps(self) -> bool:
        return self.shared.watch_steps

    def context(self, op_id: str) -> Any:
        return DurableContext(self, op_id)

    def lookup(self, parent_id: str, op_id: str) -> OpRecord | None:
        return self.checkpoints.get(op_id) if self.checkpoints else None

    def children(self, op_id: str) -> list[OpRecord]:
        return [r for r in self.checkpoints.values() if r.parent_id == op_id]

    def branch_records(self, batch_op_id: str, n: int) -> dict[int, OpRecord]:
        children = self.children(batch_op_id)
        if not children:
            return {}
        index_of = {operation_id(batch_op_id, i): i for i in range(n)}
        return {index_of[r.op_id]: r for r in children if r.op_id in index_of}

    def emit(self, rec: OpRecord, sync: bool = False) -> None:
        if self.cancelled:
            raise OrphanedChildException("branch was abandoned when its batch completed early", rec.op_id)
        self.shared.outbox.add(rec)
        if sync:
            self.shared.outbox.sync()

    def run_batch(self, spec: Any) -> tuple[dict[int, OpRecord], Any]:
        return run_batch_in_threads(self, spec)

    def for_branch(self) -> "WorkerState":
        return WorkerState(self.shared, self.checkpoints)

    def cancel(self) -> None:
        self.cancelled = True

    def run_step_body(self, func: Any, step_ctx: StepContext, watch: Any) -> Any:
        if self.cancelled:
            raise OrphanedChildException("branch was abandoned when its batch completed early", "")
        if watch is None:
            return func(step_ctx)
        self.shared.outbox.watch(watch.record, watch.timeout)
        try:
            return func(step_ctx)
        finally:
            self.shared.outbox.watch(None, None)

    def wait_callback(self, rec: OpRecord) -> OpRecord:
        """Only the driver reads the store during a run: it answers once the callback is done."""
        outbox = self.shared.outbox
        with outbox.send_lock:
            outbox.send("R")
            reply = outbox.channel.request(("K", outbox.task_id, rec))
        return reply[1]



class _ForwardHandler(logging.Handler):
    """Sends log records to the driver, which re-emits them through its own handlers."""

    def __init__(self, channel: Channel, current: Any) -> None:
        super().__init__()
        self.channel = channel
        self.current = current  # the shared slot: index of the branch being run

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = dict(record.__dict__)
            index = self.current[0]
            if index != IDLE and "branchIndex" not in data:  # which branch logged this
                data["branchIndex"] = index
            data["msg"] = record.getMessage()
            data["args"] = None
            if record.exc_info:
                data["exc_text"] = logging.Formatter().formatException(record.exc_info)
            data["exc_info"] = None
            data = {k: v for k, v in data.items() if _plain(v)}
            self.channel.send(("L", data))
        except Exception:  # noqa: BLE001 - logging must never break a branch
            pass


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the driver dies, even while user code holds the GIL in a C loop."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_SECONDS)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="durable_mp-parent-watch").start()


def worker_main(conn: Any, slot: Any, parent_pid: int, settings: dict) -> None:
    """Serve tasks until told to quit or the driver goes away."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = Channel(conn)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    current = memoryview(slot).cast(SLOT_FORMAT)
    root.addHandler(_ForwardHandler(channel, current))
    outbox = Outbox(channel)
    shared = WorkerShared(outbox, settings)
    cache: OrderedDict[str, BranchSource] = OrderedDict()
    while True:
        try:
            msg = wire.recv(conn)
        except (EOFError, OSError):
            return
        kind = msg[0]
        if kind == "T":
            _run_task(msg, shared, outbox, cache, current)
        elif kind == "C":
            _run_call(msg, channel)
        elif kind == "Q":
            return


def _run_task(msg: tuple, shared: WorkerShared, outbox: Outbox, cache: OrderedDict, current: Any) -> None:
    _, task_id, token, payload, indices, names, checkpoints = msg
    source = cache.get(token)
    if source is None:
        source = cache[token] = load_source(payload, shared.execution_id)
        while len(cache) > PAYLOAD_CACHE_SIZE:
            cache.popitem(last=False)
    if names:
        source.names = names
    outbox.task_id = task_id
    empty: dict = {}
    wall, cpu = time.monotonic(), time.process_time()
    for index in indices:
        current[0] = index
        state = WorkerState(shared, checkpoints.get(index, empty) if checkpoints else empty)
        outbox.add_item(index, run_branch(source, index, state.context))
    current[0] = IDLE
    # share of a core the chunk used: tells the driver whether the batch is CPU-bound
    outbox.send("D", (time.process_time() - cpu) / max(time.monotonic() - wall, 1e-6))


def _run_call(msg: tuple, channel: Channel) -> None:
    """One attempt of a driver-level step that needs a killable process (it has a timeout)."""
    _, task_id, payload = msg
    try:
        func, attempt, extra = cloudpickle.loads(payload)
        value = func(StepContext(Logger(extra=extra), attempt))
        try:
            data = pickle.dumps(value, protocol=PICKLE_PROTOCOL)
        except Exception:  # noqa: BLE001
            data = cloudpickle.dumps(value, protocol=PICKLE_PROTOCOL)
        channel.send(("V", task_id, True, data))
    except (KeyboardInterrupt, OrphanedChildException):
        raise
    except BaseException as exc:  # noqa: BLE001
        try:
            failure: Any = pickle.dumps(exc, protocol=PICKLE_PROTOCOL)
            pickle.loads(failure)
        except Exception:  # noqa: BLE001 - an exception that does not survive pickling travels as text
            failure = (ErrorObject.from_exception(exc).to_dict(), type(exc).__name__)
        channel.send(("V", task_id, False, failure))
