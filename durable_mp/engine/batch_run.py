"""Driver-side state of one running batch, of one worker's task, and of one watched step.

Plain records owned by the dispatcher; the branch states themselves live in the batch's
one item table (``lifecycle.BranchTable``), which its ``CompletionPolicy`` counts from.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict, deque
from typing import Any

from durable_mp.concurrency.columns import RunningColumns
from durable_mp.core.records import Attempt, OpRecord
from durable_mp.core.spec import BatchSpec
from durable_mp.engine.virtual_clock import VirtualClock
from durable_mp.serdes import DefaultSerDes, PickleSerDes

SMOOTHING = 0.3  # weight of the newest chunk in the running item-time and CPU-share estimates


class Task:
    """Work one worker is doing: a chunk of branches of a batch, or one step call."""

    __slots__ = ("id", "batch", "indices", "reported", "deadline", "timeout", "result", "started", "seen")

    def __init__(self, task_id: int, batch: BatchRun | None, indices: list[int], timeout: float | None) -> None:
        self.id = task_id
        self.batch = batch
        self.indices = indices
        self.reported: set[int] = set()
        self.timeout = timeout  # seconds the work may take once the worker has begun it
        self.deadline = time.monotonic() + timeout if timeout else None  # moved on while it has not begun
        self.result: Any = None
        self.started = time.time()
        self.seen: list[int] | None = None  # the batch's [failures, successes] counted from this worker

    def unreported(self) -> list[int]:
        return [i for i in self.indices if i not in self.reported]


class Watch:
    """A step attempt the driver enforces a timeout or memory limit on."""

    __slots__ = ("record", "deadline", "started")

    def __init__(self, record: OpRecord, timeout: float | None) -> None:
        self.record = record
        self.deadline = time.monotonic() + timeout if timeout else None
        self.started = time.time()


class BatchRun:
    """Driver-side state of one batch while it runs."""

    def __init__(self, spec: BatchSpec) -> None:
        self.spec = spec
        self.token = f"{spec.op_id}:{uuid.uuid4().hex}"
        self.payload = b""
        self.branches = spec.policy.items  # the batch's one item table: the policy counts what moves here
        self.queue: deque[int] = deque()
        self.needs_ckpt: set[int] = set()  # branches that may have checkpoints under them (resume, re-dispatch)
        # decoded results, or OpRecords / a worker's record bytes; their status is the table's (``seal``)
        self.records = RunningColumns(self.branches)
        self.crashes: defaultdict[int, int] = defaultdict(int)
        self.crash_log: dict[int, list[Attempt]] = {}  # deaths of each branch's workers, for its record
        self.item_seconds: float | None = None
        self.cpu_share: float | None = None  # share of a core a chunk used, as workers report it
        self.seen: dict[int, list[int]] = {}  # worker pid -> [failures, successes] counted from it
        self.stopping = False  # failure-triggered completion: start nothing new, let running branches finish
        self.closed = False
        # skip_time: the virtual clock that orders outcomes after their skipped sleeps
        self.clock: VirtualClock | None = VirtualClock() if spec.skip_time else None
        # default pickle serdes: results can be decoded right here, as they arrive
        self.decode_results = spec.item_serdes is None or spec.item_serdes.__class__ in (PickleSerDes, DefaultSerDes)

    @property
    def is_map(self) -> bool:
        return self.spec.funcs is None

    def observe(self, seconds: float, items: int, cpu_share: float | None = None) -> None:
        """Learn from a finished chunk: per-item time (the worker's, or the round trip), share of a core used."""
        took = seconds / max(items, 1)
        keep = 1 - SMOOTHING
        self.item_seconds = took if self.item_seconds is None else keep * self.item_seconds + SMOOTHING * took
        if cpu_share is not None:
            self.cpu_share = cpu_share if self.cpu_share is None else keep * self.cpu_share + SMOOTHING * cpu_share
