"""The driver's end of what running Dask chunks tell it: starts, streamed records, requests, log lines.

Workers publish on three Dask event topics per execution (``dask_tasks``): a chunk's start
(its task key and worker), its records in sequence-numbered messages, and ``ctx.logger``
lines.  ``WorkerStream`` subscribes to them, applies each run's messages in the order they
were produced (``_RunOrder``) into the dispatcher's ``Intake``, and answers the requests
among them through a Dask ``Variable`` per request: ``SYNC`` (after a commit),
``CALLBACK`` (once the callback is done), ``RERUN`` (what a lost run recorded) and
``HAND_OFF`` (big records waiting as a Dask key on their worker: fetched first); and it
keeps the steps with a timeout each task is running (``WATCH``, ``WATCH_END``); a run's
last message (``END``) gives back the branches it did not start.
The dispatcher (``backends.dask``) holds one and tells it which tasks are still its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from durable_mp.backends.dask_logs import log_topic
from durable_mp.backends.dask_tasks import StreamRequest, records_topic, start_topic
from durable_mp.core.records import OpRecord
from durable_mp.engine import pickling
from durable_mp.engine.batch_run import Task, Watch
from durable_mp.engine.callback_waits import CallbackWaits
from durable_mp.engine.intake import Intake
from durable_mp.engine.lifecycle import BranchState

log = logging.getLogger("durable_mp.dask")

STREAM_POLL_SECONDS = 0.01
STREAM_CATCHUP_SECONDS = 10.0  # how long a finished task's result waits for its streamed messages, then it is lost
HAND_OFF_SECONDS = 60.0  # a handed-off record is fetched within this, else its worker is taken as lost


class WorkerStream:
    """Reads the workers' events for one execution and answers their requests.

    ``task_of(key)`` is the dispatcher's running task of a Dask key (None once it ended,
    timed out or was closed); ``checkpoints(spec, index)`` what a branch recorded so far;
    ``poll_callback`` reads a callback's record from the store.  ``client`` is replaced
    when the dispatcher reconnects.
    """

    def __init__(self, client: Any, execution_id: str, store: Any, intake: Intake, stats: dict[str, int], *,
                 task_of: Callable[[str], Task | None], checkpoints: Callable[[Any, int], dict],
                 poll_callback: Any = None) -> None:
        self.client = client
        self.execution_id = execution_id
        self.store = store
        self.intake = intake
        self.stats = stats
        self.task_of = task_of
        self.checkpoints = checkpoints
        self.poll_callback = poll_callback
        self.wake = threading.Event()  # a message came (the dispatcher's futures set it too)
        self.log_events: deque[dict] = deque()  # ctx.logger records from the workers, re-emitted by the driver
        self.started: deque[Any] = deque()  # [task key, worker address, token] of tasks that started, as announced
        self.streamed: deque[list] = deque()  # records (and requests) streamed by running chunks, as they came
        self.runs: dict[tuple[str, int], _RunOrder] = {}  # (task key, run) -> its messages, applied in order
        self.replies: dict[str, list[str]] = {}  # task key -> the reply Variables it was sent (deleted at its end)
        # keyed by (task key, reply variable); a task gone is no longer waited for
        self.callback_waits = CallbackWaits(store, execution_id, poll_callback,
                                            alive=lambda key: self.task_of(key[0]) is not None,
                                            answer=lambda key, done: self.answer(key[0], key[1], done))
        self.starts: dict[str, int] = {}  # task key -> how often it started running
        self.where: dict[str, str] = {}  # task key -> the worker its last start was announced from
        self.watches: dict[str, dict[int, Watch]] = {}  # task key -> its running steps that have a timeout
        self.resubscribe = False

    # -- subscriptions ---------------------------------------------------------------------------
    def _topics(self) -> dict[str, deque]:
        return {log_topic(self.execution_id): self.log_events, start_topic(self.execution_id): self.started,
                records_topic(self.execution_id): self.streamed}

    def subscribe(self) -> None:
        """Subscribe to the workers' events; again after a reconnect (a new scheduler knows no subscriptions)."""
        wake = self.wake
        for topic, events in self._topics().items():
            def handler(event: tuple, events: deque = events) -> None:
                events.append(event[1])
                wake.set()
            self.client.subscribe_topic(topic, handler)
        self.resubscribe = False

    def unsubscribe(self) -> None:
        for topic in self._topics():
            try:
                self.client.unsubscribe_topic(topic)
            except Exception:  # noqa: BLE001 - the client lost its scheduler
                pass
        self.emit_logs()
        self.started.clear()

    def pending(self) -> bool:
        return bool(self.streamed or self.log_events)

    # -- what the workers said -------------------------------------------------------------------
    def emit_logs(self) -> None:
        events = self.log_events
        while events:
            record = logging.makeLogRecord(events.popleft())
            logging.getLogger(record.name).handle(record)

    def read_starts(self) -> None:
        """Tasks that said they started: count their runs; a timed chunk's ``branch_timeout`` runs from now."""
        while self.started:
            key, address, _token = self.started.popleft()
            task = self.task_of(key)
            if task is None or task.batch is None:
                continue
            self.starts[key] = self.starts.get(key, 0) + 1
            self.where[key] = address
            timeout = task.batch.spec.branch_timeout
            if timeout and task.deadline is None:
                task.deadline = time.monotonic() + timeout

    def read(self) -> None:
        """Apply streamed messages in each run's order; answer the requests among them."""
        while self.streamed:
            message = self.streamed.popleft()
            key, run, seq = message[0], message[1], message[2]
            task = self.task_of(key)
            if task is None:  # the task ended, timed out or was closed
                if message[6]:
                    self.answer(key, message[6], None)
                continue
            order = self.runs.setdefault((key, run), _RunOrder())
            for ready in order.ready(seq, message):
                self._apply(task, key, ready)

    def _apply(self, task: Task, key: str, message: list) -> None:
        _, _, _, nested, items, request, reply, data = message
        if request and StreamRequest(request) is StreamRequest.HAND_OFF:
            fetched = self._fetch(data)
            if fetched is None:  # lost with its worker (whose branch counts as running), or the worker
                self.answer(key, reply, False)  # is still there and keeps them for its result
                return
            nested, items = fetched
        self.intake.stage_nested(nested)
        items = [item for item in items if item[0] not in task.reported]
        if items and task.batch is not None and not task.batch.closed:
            self.intake.finish_items(task, items)
        if not request:
            return
        kind = StreamRequest(request)
        if kind is StreamRequest.HAND_OFF:
            self.answer(key, reply, True)
            return
        if kind is StreamRequest.WATCH:
            watch_id, rec, timeout = pickling.loads(data)
            self.watches.setdefault(key, {})[watch_id] = Watch(OpRecord.loads(rec), timeout)
            return
        if kind is StreamRequest.WATCH_END:
            self.watches.get(key, {}).pop(pickling.loads(data), None)
            return
        if kind is StreamRequest.END:  # from now on only its result may come: none of these is running
            unstarted = pickling.loads(data)
            if unstarted:
                task.indices = [i for i in task.indices if i not in set(unstarted)]
                if task.batch is not None and not task.batch.closed:
                    self.intake.return_unstarted(task.batch, unstarted)
            return
        self.store.flush()  # a request's records are committed before it is answered
        if kind is StreamRequest.SYNC:
            self.answer(key, reply, True)
            return
        if kind is StreamRequest.CALLBACK:
            self.callback_waits.add((key, reply), OpRecord.loads(data))
            self.poll_callbacks()
            return
        batch = task.batch  # RERUN: what the earlier runs recorded
        assert batch is not None
        done = sorted(task.reported)
        failed = sum(1 for i in done if batch.branches.state(i) is BranchState.FAILED)
        fresh = {i: self.checkpoints(batch.spec, i) for i in task.unreported()}
        self.stats["reruns"] = self.stats.get("reruns", 0) + 1
        self.answer(key, reply, (done, [failed, len(done) - failed], fresh))

    def _fetch(self, data_key: str) -> Any:
        """Records a worker handed off (a Dask key in its memory, held until we answer), or None if lost."""
        from distributed import Variable

        variable = Variable(data_key, client=self.client)
        future: Any = None
        try:
            future = variable.get(timeout=HAND_OFF_SECONDS)
            return future.result(timeout=HAND_OFF_SECONDS)
        except Exception as exc:  # noqa: BLE001 - its worker died meanwhile, or the scheduler went away
            log.warning("could not fetch records handed off by a Dask worker (%s: %s)", type(exc).__name__, exc)
            return None
        finally:
            try:
                variable.delete()
                if future is not None:
                    future.release()
            except Exception:  # noqa: BLE001 - the scheduler went away, and its variables with it
                pass

    def answer(self, key: str, reply: str, value: Any) -> None:
        from distributed import Variable

        try:
            Variable(reply, client=self.client).set(pickling.dumps(value))
        except Exception:  # noqa: BLE001 - the scheduler went away: the task is lost with it
            return
        self.replies.setdefault(key, []).append(reply)

    def poll_callbacks(self) -> None:
        """Answer the branches that wait for a callback once it is done (``poll_callback`` reads the store)."""
        self.callback_waits.poll()

    def caught_up(self, key: str, run: int, sent: int) -> bool:
        """Wait (boundedly) until every message a finished run streamed is applied: its result comes after them."""
        deadline = time.monotonic() + STREAM_CATCHUP_SECONDS
        while True:
            self.read()
            order = self.runs.get((key, run))
            if (order.next if order else 0) >= sent:
                return True
            if time.monotonic() > deadline:
                log.warning("Dask task %s finished, but %d of its %d streamed messages never came", key,
                            sent - (order.next if order else 0), sent)
                return False
            self.wake.wait(STREAM_POLL_SECONDS)
            self.wake.clear()

    def forget(self, key: str) -> None:
        """A task's end: drop its stream state and its reply Variables."""
        from distributed import Variable

        self.starts.pop(key, None)
        self.where.pop(key, None)
        self.watches.pop(key, None)
        for run_key in [k for k in self.runs if k[0] == key]:
            del self.runs[run_key]
        for reply in self.replies.pop(key, []):
            try:
                Variable(reply, client=self.client).delete()
            except Exception:  # noqa: BLE001 - the scheduler went away, and its variables with it
                pass


class _RunOrder:
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
