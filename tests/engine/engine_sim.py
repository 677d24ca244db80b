"""Deterministic simulation of the engine: one process, one OS thread, every choice from a seed.

What runs for real
    ``engine.dispatcher.Dispatcher.run_batch`` as it is: record intake, chunking and start
    budgets (``engine.scheduling``), death handling (``engine.faults``), the ``BranchTable``
    state machine, the ``CompletionPolicy``.  In the worker: ``engine.worker.Outbox``
    (batching, flush, sync, chunk done) and ``Channel.send`` (its lock and, where the
    protocol has them, its message numbers), ``scheduling.stop_chunk``.  In the store:
    ``store.commit.GroupCommit`` staging (overlay, hand-off, ``_commit``, latching) and,
    where it exists, ``store.forward``'s refusal of a record moving backwards.
    Records are real ``OpRecord`` bytes and compact item records.

What is simulated
    * Processes and pipes.  A ``SimWorker`` is the driver's handle (what ``pool.Worker``
      offers the dispatcher, including ``protocol.Sequence`` checks where they exist) and
      the worker process behind it.  A pipe is a FIFO of message objects; a sentinel is
      readable once its worker died.  The dispatcher waits in ``multiprocessing.connection.wait``;
      the simulation replaces that one name, and inside it the scheduler runs the workers
      until the dispatcher may wake (a handle is ready).
    * Threads.  A worker's threads (the main thread running chunks, the branch threads of
      a nested parallel, the outbox's flusher, the reader routing the driver's messages)
      are generators, switching only at yield points: before an item's first step, after
      each step, between the branches of a nested parallel, after each item of a chunk,
      while blocked on a reply, and *between taking records and sending them*: a send
      made without the outbox's ``send_lock`` held is where its thread may be preempted,
      and the scheduler performs it later (a send under the lock happens at once, since
      the lock orders it against every other record-carrying send).  That is the window
      of defect 2 (``Outbox.sync`` took under the lock and sent after releasing it).  The
      scheduler offers a send in flight less often than other work (``SLOW_WRITE``), so
      such a window stays open while other threads run a whole step; the flusher sleeps
      ``OUTBOX_FLUSH_SECONDS`` of simulated time before it sends, as the real one does.
    * Branch bodies: a small program per map item, recording what the engine's context
      records: step ``a`` (at most once: STARTED is synced, so committed, before its body),
      step ``b`` (at least once), and for some items a nested parallel whose branches are
      recorded STARTED and run an at-most-once step each on their own threads.  Replay
      returns checkpointed values; an at-most-once step found STARTED runs a new attempt.
    * The committer thread and the disk: a commit is a scheduler step, or happens when the
      driver waits for it (``flush``); an attempt may fail (retried, as ``with_retries``),
      and a disk may refuse every write (the store latches ``CheckpointFailedError``).
    * The clock: ``time`` in ``engine.worker``, ``dispatcher``, ``intake`` and ``supervision`` reads a simulated
      clock the scheduler advances, so the outbox's flush timing is part of the schedule.

Faults: a worker death at any step (records still in its outbox, a send in flight, after
a send), commit failures, an unwritable store, and a driver crash (staged records lost,
every worker gone) followed by a restart from the committed records.

Invariants (``Checker``), checked at every staged record, dispatch, message and step body:
    ``BACKWARDS``        a record's status never moves backwards (STARTED < PENDING < terminal);
    ``UNDER_TERMINAL``   no record is staged non-terminal under a parent recorded terminal;
    ``NO_CHECKPOINTS``   a branch that may have started (records under it in the store) is
                         dispatched with all of them as checkpoints;
    ``RAN_TWICE``        an at-most-once step attempt whose start was committed never runs again;
    ``OUT_OF_ORDER``     the driver applies a worker's records in the order they left its outbox;
    ``INTERNAL``         the engine raises no internal error; no deadlock, no livelock;
and at the end (``RESULT``, ``LEFT_OPEN``) the map's result read back from the store
(reason, status and value per item) equals the fault-free result, and no record is left
non-terminal.  ``Sim(..., ignore=[...])`` only traces the named invariants, to see what
else a defect leads to.

A schedule is a seed and a profile (``PROFILES``): ``Sim(seed, profile).run()`` replays it
exactly.  A violation raises ``Violation``, whose message names the seed and the command
that replays it (``python tests/engine/engine_sim.py SEED PROFILE``).
"""

from __future__ import annotations

import itertools
import logging
import pickle
import random
import sys
import types
from collections import deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

from durable_mp import serdes
from durable_mp.concurrency.models import CompletionPolicy, CompletionReason
from durable_mp.config import CompletionConfig
from durable_mp.core.item_probe import split_terminal
from durable_mp.core.records import (
    TERMINAL,
    OpRecord,
    OpStatus,
    OpType,
    branch_key,
    item_prefix,
    item_record,
    operation_id,
)
from durable_mp.core.spec import BatchSpec
from durable_mp.engine import dispatcher as dispatcher_module
from durable_mp.engine import intake as intake_module
from durable_mp.engine import protocol
from durable_mp.engine import supervision as supervision_module
from durable_mp.engine import wire
from durable_mp.engine import worker as worker_module
from durable_mp.engine.branch import started_record
from durable_mp.engine.dispatcher import Dispatcher
from durable_mp.engine.lifecycle import WorkerState, check_worker_move
from durable_mp.engine.pool import Death, Worker
from durable_mp.engine.protocol import Quit, Reply, RunChunk, StopBatch
from durable_mp.engine.result_decode import success_value
from durable_mp.engine.scheduling import stop_chunk
from durable_mp.exceptions import CheckpointFailedError
from durable_mp.lambda_service import ErrorObject
from durable_mp.store.commit import COMMIT_ATTEMPTS, GroupCommit
from durable_mp.store.records import SEP

try:  # the store's refusal of records moving backwards (issue 18), where it exists
    from durable_mp.store import forward as store_forward
except ImportError:
    store_forward = None

PROGRESS_SHIFT = getattr(worker_module, "PROGRESS_SHIFT", None)  # where the slot records a chunk's progress
Sequence = getattr(protocol, "Sequence", None)  # the driver's check of per-worker message numbers, where it exists
# the names the simulation replaces while a schedule runs (restored after it)
PATCHED = ((dispatcher_module, "wait"), (dispatcher_module, "time"), (intake_module, "time"),
           (supervision_module, "time"), (worker_module, "time"), (worker_module, "wire"))
EXEC_ID = "sim-exec"
MAP_OP = operation_id("", 1)
MAX_STEPS = 50_000  # scheduler steps per schedule before it counts as a livelock
DRIVER_WAKES = 0.25  # chance, per scheduler step, that a driver with a ready handle returns from wait
SLOW_WRITE = 0.3  # chance, per step, that a send in flight is among the choices (when other work is)
TICKS = (0.0002, 0.001, 0.003)  # how far the clock may move in one step (the outbox batches for 5 ms)
KILLED = 9  # a wait status: killed by SIGKILL
SUB_MAP, SUB_ITEM, SUB_PARALLEL, SUB_BRANCH, SUB_STEP = "Map", "MapIteration", "Parallel", "ParallelBranch", "Step"
REPLAY = ("PYTHONPATH=. python tests/engine/engine_sim.py {seed} {profile}  "
          "(or DURABLE_MP_SIM_SEED={seed} python -m pytest tests/engine/test_engine_sim.py)")

# the invariants, as ``Violation.invariant`` names them
BACKWARDS = "a record's status moved backwards"
UNDER_TERMINAL = "a record STARTED under a parent recorded terminal"
NO_CHECKPOINTS = "a branch that may have started was dispatched without its checkpoints"
RAN_TWICE = "an at-most-once step whose start was committed ran its body again"
OUT_OF_ORDER = "a worker's records were applied out of order"
RESULT = "the result differs from the fault-free result"
LEFT_OPEN = "a record is left non-terminal after the job succeeded"
INTERNAL = "the engine raised an internal error"
INVARIANTS = {"BACKWARDS": BACKWARDS, "UNDER_TERMINAL": UNDER_TERMINAL, "NO_CHECKPOINTS": NO_CHECKPOINTS,
              "RAN_TWICE": RAN_TWICE, "OUT_OF_ORDER": OUT_OF_ORDER, "RESULT": RESULT, "LEFT_OPEN": LEFT_OPEN,
              "INTERNAL": INTERNAL}  # by the names the command line's --ignore takes

Wait = Callable[[], bool]  # what a blocked sim thread waits for
Program = Generator[Any, None, Any]  # a sim thread's body: yields None (a yield point) or a Wait
Action = tuple[Callable[[Any], None], Any]  # one step the scheduler may take: (what, on what)


class Violation(AssertionError):
    """An invariant failed in a schedule; the message says which, and how to replay it."""

    def __init__(self, seed: int, profile: str, invariant: str, detail: str, ignored: Iterable[str] = ()) -> None:
        self.seed, self.profile, self.invariant = seed, profile, invariant
        names = [name for name, text in INVARIANTS.items() if text in set(ignored)]
        profile_args = f"{profile} --ignore {' '.join(sorted(names))}" if names else profile
        super().__init__(f"seed {seed} ({profile}): {invariant}: {detail}\n"
                         f"  replay: {REPLAY.format(seed=seed, profile=profile_args)}")


class DriverCrash(Exception):
    """The simulated driver process died (SIGKILL): nothing it staged is kept."""


# -- scenarios ------------------------------------------------------------------------------------

# mixed: nested parallels, failing items, worker deaths, commit failures, a driver crash or unwritable store;
# deaths: larger maps of top-level steps and worker deaths (defect 1); nested: nested parallels and no
# fault (defect 2); clean: top-level steps and failing items, no fault.
PROFILES = ("mixed", "deaths", "nested", "clean")


@dataclass(frozen=True)
class Scenario:
    """The job and the faults one schedule may inject, drawn from its seed."""

    n: int
    max_concurrency: int
    max_workers: int
    nested: tuple[bool, ...]  # per item: does it run a nested parallel?
    failing: tuple[bool, ...]  # per item: does it raise after its steps? (tolerated: the map still completes)
    deaths: int  # worker deaths allowed (below the crash retries, so no branch fails for them)
    driver_crashes: int  # crashes and unwritable stores allowed
    commit_failures: bool

    @classmethod
    def draw(cls, rng: random.Random, profile: str) -> Scenario:
        n = rng.randint(6, 16) if profile == "deaths" else rng.randint(2, 6) if profile == "nested" else rng.randint(3, 10)
        nested_share = {"mixed": 0.4, "deaths": 0.0, "nested": 0.8, "clean": 0.0}[profile]
        faults = profile in ("mixed", "deaths")
        return cls(n=n, max_concurrency=rng.randint(1, 3), max_workers=rng.randint(1, 3),
                   nested=tuple(rng.random() < nested_share for _ in range(n)),
                   failing=tuple(profile != "nested" and rng.random() < 0.15 for _ in range(n)),
                   deaths=rng.randint(1, 2) if faults else 0,
                   driver_crashes=rng.randint(0, 1) if profile == "mixed" else 0,
                   commit_failures=profile == "mixed")


def branch_count(index: int) -> int:
    return 2 + index % 2


def step_value(index: int, which: int) -> int:
    return 10 * index + which


def expected_value(index: int, nested: bool) -> int:
    """What item ``index`` returns, fault-free."""
    value = step_value(index, 1) + step_value(index, 2)
    if nested:
        k = branch_count(index)
        value += sum(100 * index + j for j in range(k)) + 1000 * k
    return value


def sim_item(ctx: Any, item: Any, index: int, items: Any) -> Any:
    """The map function the dispatcher pickles into its payload; the simulated workers run ``ItemProgram``."""
    raise AssertionError("a simulated worker never calls the payload")


# -- the store ------------------------------------------------------------------------------------

class SimGroupCommit(GroupCommit):
    """The real group commit, with its committer thread replaced by scheduler steps.

    ``drain`` (a caller waiting for the in-flight commit) runs that commit at once, as the
    waiting caller would see it done; the scheduler's ``committer_step`` is the thread
    waking on its own.  A commit retries failed attempts like ``with_retries``, then latches.
    """

    def _wake_committer(self) -> None:
        pass  # the simulated committer runs as a scheduler step

    def drain(self) -> None:
        if self._committing is not None and self._failure is None:
            self.commit_now()
        if self._failure is not None:
            raise self._failure

    def commit_now(self) -> None:
        batch = self._committing
        assert batch is not None
        last: Exception | None = None
        for _ in range(COMMIT_ATTEMPTS):
            try:
                self._commit(batch)
                break
            except OSError as exc:
                last = exc
        else:
            assert last is not None
            self.latch(last, "committing a batch of checkpoints")
            return
        self._committing = None

    def committer_step(self) -> None:
        if self._failure is not None:
            return
        if self._committing is not None:
            self.commit_now()
        elif self._staged_count:
            self._start_commit(block=False)  # the batch is due: hand it over (written at a later step)

    def busy(self) -> bool:
        return self._failure is None and (self._committing is not None or self._staged_count > 0)


class SimStore:
    """What the dispatcher needs of ``store.Store``: staging through ``SimGroupCommit``, reads of
    the overlay over ``durable`` (the committed records, which survive a driver crash)."""

    def __init__(self, sim: Sim, durable: dict[tuple[str, str], bytes]) -> None:
        self.sim = sim
        self.durable = durable
        self.crashed = False
        self.group = SimGroupCommit(self._write, lambda exec_id, parent_id: None, where="/tmp",
                                    flush_count=sim.rng.choice((4, 16, 64)), flush_seconds=0.005,
                                    clock=sim.clock.monotonic)

    def _alive(self) -> None:
        if self.crashed:
            raise DriverCrash("the driver is dead")

    def _write(self, items: list[tuple[bytes, Any]]) -> None:
        """``Store._put_items``: one atomic write; where the store refuses records moving backwards
        (``store.forward``), a record that would move a committed one backwards is left out and
        the refusal latched, as there."""
        self.sim.maybe_fail_commit()
        refused = None
        for key, data in items:
            _, parent_id, op_key = key.decode().split(SEP)
            old = self.durable.get((parent_id, op_key))
            how = store_forward.backwards(old, data) if store_forward is not None and old is not None else None
            if how is not None:
                refused = refused or store_forward.refusal(f"{parent_id}/{op_key}", how)
                continue
            self.durable[(parent_id, op_key)] = bytes(data)
        if refused is not None:
            self.group.refuse(refused)

    # staging: every record passes the invariant checker first
    def stage_many(self, exec_id: str, parent_id: str, entries: Iterable[tuple[str, Any]]) -> None:
        self._alive()
        entries = list(entries)
        for _, data in entries:
            self.sim.checker.staged(data)
        self.group.stage_many(exec_id, parent_id, entries)

    def stage_items(self, exec_id: str, parent_id: str, indices: list[int], records: list[Any]) -> None:
        self._alive()
        for data in records:
            self.sim.checker.staged(data)
        self.group.stage_items(exec_id, parent_id, indices, records)

    def stage_raw(self, exec_id: str, parent_id: str, op_id: str, data: Any) -> None:
        self.stage_many(exec_id, parent_id, [(op_id, data)])

    def stage(self, exec_id: str, rec: OpRecord) -> None:
        self.stage_raw(exec_id, rec.parent_id, rec.op_id, rec.dumps())

    def flush(self) -> int:
        self._alive()
        return self.group.flush()

    # reads: the committed records under the uncommitted ones, as ``Store`` reads them
    def view(self) -> dict[tuple[str, str], Any]:
        out: dict[tuple[str, str], Any] = dict(self.durable)
        for (_, parent_id), group in self.group.pending_items():
            for key, data in group.items():
                out[(parent_id, key)] = data
        return out

    def parents_with_children(self, exec_id: str) -> set[str]:
        return {parent_id for parent_id, _ in self.view()}

    def subtree(self, exec_id: str, op_id: str, view: dict[tuple[str, str], Any] | None = None) -> dict[str, OpRecord]:
        by_parent: dict[str, list[Any]] = {}
        for (parent_id, _), data in (self.view() if view is None else view).items():
            by_parent.setdefault(parent_id, []).append(data)
        out: dict[str, OpRecord] = {}
        frontier = [op_id]
        while frontier:
            for data in by_parent.get(frontier.pop(), ()):
                rec = self.sim.record(data)
                out[rec.op_id] = rec
                frontier.append(rec.op_id)
        return out


# -- invariants -----------------------------------------------------------------------------------

def rank(status: str) -> int:
    return 2 if status in TERMINAL else 1 if status == OpStatus.PENDING else 0


class Checker:
    """The invariants, checked where the simulation sees records move."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.status: dict[str, str] = {}  # op id -> status of its newest staged record
        self.ran: set[tuple[str, int]] = set()  # (op id, attempt) of at-most-once bodies that ran

    def fail(self, invariant: str, detail: str) -> None:
        if invariant in self.sim.ignore:  # see what a violation leads to, if this check did not stop it
            self.sim.trace.append(f"ignored {invariant}: {detail}")
            return
        raise Violation(self.sim.seed, self.sim.profile, invariant, detail, self.sim.ignore)

    def rebuild(self, durable: dict[tuple[str, str], bytes]) -> None:
        """After a driver restart: what is visible is what was committed."""
        self.status = {}
        for data in durable.values():
            rec = self.sim.record(data)
            self.status[rec.op_id] = rec.status

    def staged(self, data: Any) -> None:
        rec = self.sim.record(data)
        old = self.status.get(rec.op_id)
        if old is not None and rank(rec.status) < rank(old):
            self.fail(BACKWARDS, f"{rec.sub_type} {rec.name!r} ({rec.op_id[:12]}): "
                      f"{old} -> {rec.status}")
        if rec.status not in TERMINAL and self.status.get(rec.parent_id, "") in TERMINAL:
            self.fail(UNDER_TERMINAL,
                      f"{rec.sub_type} {rec.name!r} {rec.status} under parent {rec.parent_id[:12]} "
                      f"{self.status[rec.parent_id]}")
        self.status[rec.op_id] = rec.status

    def dispatched(self, store: SimStore, indices: list[int], checkpoints: dict[int, dict[str, Any]] | None) -> None:
        view = store.view()
        for index in indices:
            recorded = store.subtree(EXEC_ID, operation_id(MAP_OP, index), view)
            if not recorded:
                continue
            sent = (checkpoints or {}).get(index) or {}
            missing = sorted(set(recorded) - set(sent))
            if missing:
                self.fail(NO_CHECKPOINTS,
                          f"map item {index}: {len(missing)} of its {len(recorded)} records not sent "
                          f"({', '.join(f'{recorded[m].name} {recorded[m].status}' for m in missing)})")

    def body(self, op_id: str, name: str, attempt: int) -> None:
        if (op_id, attempt) in self.ran:
            self.fail(RAN_TWICE,
                      f"step {name!r} attempt {attempt}")
        self.ran.add((op_id, attempt))


# -- workers --------------------------------------------------------------------------------------

class SimThread:
    __slots__ = ("name", "program", "waiting", "write")

    def __init__(self, name: str, program: Program) -> None:
        self.name = name
        self.program = program
        self.waiting: Wait | None = None
        self.write: Any = None  # (message, gathered) this thread is about to send: it took the records already


class Sentinel:
    """A worker's process sentinel as ``wait`` sees it: ready once the worker died."""

    __slots__ = ("ready",)

    def __init__(self, ready: Callable[[], bool]) -> None:
        self.ready = ready


class SimConn:
    """The driver's end of a worker's pipe: ``poll`` for ``Dispatcher._read``, ``ready`` for ``wait``."""

    def __init__(self, worker: SimWorker) -> None:
        self.worker = worker

    def poll(self) -> bool:
        return bool(self.worker.pipe)

    def ready(self) -> bool:
        return bool(self.worker.pipe)


class SimChannel(worker_module.Channel):
    """``worker.Channel`` whose requests do not block the OS thread, and whose sends may be overtaken.

    A send made while the sending thread holds the outbox's ``send_lock`` happens at once
    (``Channel.send`` for real: its lock, its numbering if it has one); a send made without
    it is where that thread is preempted: the scheduler later performs it (``SimWorker.actions``).
    A request's sender waits for the reply at its next yield (``SimWorker.reply_wait``).
    """

    def send(self, msg: Any, gathered: bool = False) -> None:
        worker: SimWorker = self.conn.worker
        thread = worker.current
        if thread is not None and not worker.outbox.send_lock._is_owned():  # type: ignore[attr-defined]
            assert thread.write is None
            thread.write = (msg, gathered)
            return
        super().send(msg, gathered)

    def post(self, build: Callable[[int], Any], gathered: bool = True) -> Any:
        request_id = next(self._ids)
        self.conn.worker.last_request = request_id
        self.send(build(request_id), gathered)
        return request_id

    @staticmethod
    def wait(slot: Any) -> Any:
        return None

    def request(self, build: Callable[[int], Any], gathered: bool = True) -> Any:
        return self.wait(self.post(build, gathered))


def _sim_send(conn: Any, msg: Any, *, gathered: bool = False, sentinel: int | None = None) -> None:
    conn.worker.pipe.append(msg)


SIM_WIRE = types.SimpleNamespace(send=_sim_send, recv=wire.recv, big=wire.big, Gather=wire.Gather)


class SimWorker:
    """One worker: the driver's handle (the attributes ``pool.Worker`` has) and the process behind it."""

    def __init__(self, sim: Sim, pid: int, outbox_class: type[worker_module.Outbox]) -> None:
        self.sim = sim
        self.pid = pid
        # driver side
        self.conn = SimConn(self)
        self.sentinel = Sentinel(lambda: self.dead)
        self.tokens: set[str] = set()
        self.task: Any = None
        self.queued: Any = None
        self.watches: dict[int, Any] = {}
        self.cpu_mark: tuple[float, float] | None = None
        self.status = WorkerState.STARTING
        self.used = False
        self.heard = False  # ``pool.Worker.heard``
        self.applied = 0  # outbox take number of the last records the driver applied
        self.sequence = Sequence(f"worker pid {pid}") if Sequence is not None else None
        # the process
        self.dead = False
        self.pipe: deque[Any] = deque()  # worker -> driver
        self.inbound: deque[Any] = deque()  # driver -> worker, before the reader thread routes it
        self.inbox: deque[Any] = deque()
        self.replied: set[int] = set()
        self.last_request = 0
        # the shared slot, read by ``pool.Worker``'s own methods: [running index, chunk progress word]
        self.index_view = [worker_module.IDLE, 0, 0]
        self.outcomes: dict[str, list[int]] = {}
        self.channel = SimChannel(self.conn)
        self.outbox = outbox_class(self.channel)
        self.outbox.flusher = NO_FLUSHER_THREAD  # ``_flusher`` is the flusher thread
        self.taken: dict[int, int] = {}  # id(records list) -> take number
        self.takes = itertools.count(1)
        self._wrap_take()
        self.flusher_wakes: float | None = None  # the flusher thread sleeps until then
        self.threads: list[SimThread] = [SimThread("main", self._main()), SimThread("flusher", self._flusher())]
        self.current: SimThread | None = None

    def _wrap_take(self) -> None:
        """Number every take of the outbox, so the driver's order can be checked against it."""
        take = getattr(self.outbox, "_take", None)
        if take is None:
            return

        def numbered() -> Any:
            taken = take()
            if taken[0] or taken[1] or taken[2]:  # records, not an empty sync
                self.taken[id(taken[0])] = next(self.takes)
            return taken

        self.outbox._take = numbered  # type: ignore[method-assign]

    # -- driver side (``pool.Worker``) -----------------------------------------------------------
    def move(self, to: WorkerState) -> None:
        check_worker_move(self.status, to, self.pid)
        self.status = to

    def send(self, msg: Any) -> None:
        if self.dead:
            raise BrokenPipeError("simulated worker is dead")
        self.used = True
        if isinstance(msg, RunChunk):
            self.sim.checker.dispatched(self.sim.store, msg.indices, msg.checkpoints)
        self.inbound.append(msg)

    def recv(self) -> Any:
        msg = self.pipe.popleft()
        self.heard = True
        if self.sequence is not None:  # ``pool.Worker.recv``: the protocol's own order check
            msg = self.sequence.check(msg)
        nested = getattr(msg, "nested", None)
        if nested is not None:
            number = self.taken.pop(id(nested), None)
            if number is not None:
                if number < self.applied:
                    self.sim.checker.fail(OUT_OF_ORDER,
                                          f"worker {self.pid}: take {number} applied after take {self.applied} "
                                          f"({type(msg).__name__})")
                self.applied = number
        return msg

    def is_dead(self) -> bool:
        return self.dead

    running_index = Worker.running_index  # the driver reads the slot as it does for a real worker
    if hasattr(Worker, "sleeping"):  # in a durable sleep (where the slot records it)
        sleeping = Worker.sleeping
    if hasattr(Worker, "begun"):  # how far into a chunk the worker got (where the slot records it)
        begun = Worker.begun

    def over(self, limit: int) -> int:
        return 0

    def cpu_seconds(self) -> float:
        return self.sim.clock.now

    def state(self) -> str:
        return "running"

    def close_handles(self) -> None:
        pass

    # -- the process -----------------------------------------------------------------------------
    def reply_wait(self) -> Wait:
        request_id = self.last_request
        return lambda: request_id in self.replied

    def spawn(self, name: str, program: Program) -> None:
        self.threads.append(SimThread(name, program))

    def die(self) -> None:
        self.dead = True
        if self in self.sim.live:
            self.sim.live.remove(self)
        self.threads = []  # the shared slot keeps the index it held: the driver reads it after the death

    def actions(self, out: list[Action], writes: list[Action]) -> None:
        """Append what this worker's threads can do next (sends in flight go to ``writes``)."""
        for thread in self.threads:
            if thread.write is not None:
                writes.append((self._complete_write, thread))
            elif thread.waiting is None or thread.waiting():
                out.append((self._step, thread))
        if self.inbound:
            out.append((self._route, None))

    def _complete_write(self, thread: SimThread) -> None:
        msg, gathered = thread.write
        thread.write = None
        worker_module.Channel.send(self.channel, msg, gathered)

    def _step(self, thread: SimThread) -> None:
        thread.waiting = None
        self.current = thread
        try:
            waiting = next(thread.program)
        except StopIteration:
            self.threads.remove(thread)
            return
        finally:
            self.current = None
        thread.waiting = waiting

    def _route(self, _: None) -> None:
        """The reader thread: replies wake their requester, StopBatch raises a flag, work goes to the inbox."""
        msg = self.inbound.popleft()
        match msg:
            case Reply():
                self.replied.add(msg.request_id)
            case StopBatch():
                self.channel.stopped.add(msg.token)
            case _:
                self.inbox.append(msg)

    def _flusher(self) -> Program:
        """``Outbox._flush_loop``: woken by ``pending``, it sleeps ``OUTBOX_FLUSH_SECONDS`` of the
        simulated clock, then sends what waits."""
        pending = self.outbox.pending
        clock = self.sim.clock
        while True:
            yield pending.is_set
            self.flusher_wakes = clock.now + worker_module.OUTBOX_FLUSH_SECONDS
            yield lambda: clock.now >= self.flusher_wakes  # type: ignore[operator]
            self.flusher_wakes = None
            pending.clear()
            self.outbox.flush()

    def _main(self) -> Program:
        while True:
            yield lambda: bool(self.inbox)
            msg = self.inbox.popleft()
            if isinstance(msg, Quit):
                return
            yield from self._run_chunk(msg)

    def _run_chunk(self, msg: Any) -> Program:
        """``worker._run_chunk``, with a yield point after each item."""
        outbox = self.outbox
        outcomes = self.outcomes.setdefault(msg.token, [0, 0])
        outbox.task_id = msg.task_id
        budget = msg.budget
        limited = budget.failures is not None or budget.successes is not None
        unstarted: list[int] = []
        for position, index in enumerate(msg.indices):
            if msg.token in self.channel.stopped or (limited and stop_chunk(budget, outcomes[0], outcomes[1])):
                unstarted = list(msg.indices[position:])
                break
            self.index_view[0] = index
            if PROGRESS_SHIFT is not None:
                self.index_view[1] = (msg.task_id << PROGRESS_SHIFT) + position + 1
            checkpoints = (msg.checkpoints or {}).get(index) or {}
            data, value = yield from ItemProgram(self, index, checkpoints).run()
            if data.__class__ is bytes:  # a plain success
                outbox.add_succeeded(index, data, value)
                outcomes[1] += 1
            else:
                outbox.add_item(index, data)
                outcomes[data.status == OpStatus.SUCCEEDED] += 1
            yield None
        self.index_view[0] = worker_module.IDLE
        yield None
        ran = len(msg.indices) - len(unstarted)
        outbox.chunk_done(unstarted, 1.0, 0.0005 * max(ran, 1))


NO_FLUSHER_THREAD = object()  # stands in Outbox.flusher: the outbox never starts its own thread


class ItemProgram:
    """One map item's body, as the context runs it: step ``a`` (at most once), then either a
    nested parallel of at-most-once steps or step ``b`` (at least once)."""

    def __init__(self, worker: SimWorker, index: int, checkpoints: dict[str, OpRecord]) -> None:
        self.w = worker
        self.index = index
        self.ckpt = checkpoints
        self.op_id = operation_id(MAP_OP, index)
        self.clock = worker.sim.clock

    def run(self) -> Program:
        """The item's body; returns what ``BranchRunner.run`` returns: (compact record, value) or (FAILED record, None)."""
        index = self.index
        yield None  # user code before the first step
        value = yield from self.step(self.op_id, operation_id(self.op_id, 1), "a", step_value(index, 1), True)
        yield None
        value += yield from self.step(self.op_id, operation_id(self.op_id, 2), "b", step_value(index, 2), False)
        if self.w.sim.scenario.nested[index]:
            yield None
            value += yield from self.nested_parallel(operation_id(self.op_id, 3))
        now = self.clock.time()
        if self.w.sim.scenario.failing[index]:
            error = ErrorObject.from_exception(ValueError(f"item {index} fails ({value})")).to_dict()
            return OpRecord(self.op_id, MAP_OP, OpType.CONTEXT, SUB_ITEM, f"map-item-{index}", OpStatus.FAILED,
                            now, now, None, error, 1, pid=self.w.pid), None
        parent, sub_type = item_prefix(MAP_OP, SUB_ITEM)
        text = serdes.envelope_of(value)
        assert text is not None
        now = self.clock.time()
        return item_record(self.op_id, parent, sub_type, f"map-item-{index}", now, now, self.w.pid, text), value

    def step(self, parent_id: str, op_id: str, name: str, value: int, at_most_once: bool) -> Program:
        rec = self.ckpt.get(op_id)
        if rec is not None and rec.status == OpStatus.SUCCEEDED:
            assert isinstance(rec.result, bytes)
            replayed: int = pickle.loads(rec.result)
            return replayed
        attempt = 1 if rec is None else rec.attempt + (1 if at_most_once else 0)
        start = OpRecord(op_id, parent_id, OpType.STEP, SUB_STEP, name, OpStatus.STARTED, self.clock.time(),
                         attempt=attempt, pid=self.w.pid)
        outbox = self.w.outbox
        if at_most_once:  # the start is committed before the body runs (``WorkerState.emit(sync=True)``)
            outbox.add(start)
            outbox.sync()
            yield self.w.reply_wait()
            self.w.sim.checker.body(op_id, name, attempt)
        yield None
        outbox.add(start._replace(status=OpStatus.SUCCEEDED, end_ts=self.clock.time(),
                                  result=pickle.dumps(value)))
        return value

    def nested_parallel(self, par_id: str) -> Program:
        """``threads.run_batch_in_threads`` for a parallel of k branches, each one at-most-once step."""
        k = branch_count(self.index)
        rec = self.ckpt.get(par_id)
        children = {j: self.ckpt.get(operation_id(par_id, j)) for j in range(k)}
        values: dict[int, int] = {}
        for j, child in children.items():
            if child is not None and child.status == OpStatus.SUCCEEDED:
                assert isinstance(child.result, bytes)
                values[j] = pickle.loads(child.result)
        if rec is not None and rec.status in TERMINAL:
            return sum(values.values()) + 1000 * len(values)
        outbox = self.w.outbox
        base = rec or OpRecord(par_id, self.op_id, OpType.CONTEXT, SUB_PARALLEL, "nested", OpStatus.STARTED,
                               self.clock.time())
        if rec is None:
            outbox.add(base)
        finished: deque[tuple[int, OpRecord]] = deque()
        running = 0
        for j in range(k):
            if j in values:
                continue
            outbox.add(started_record(par_id, SUB_BRANCH, f"branch-{j}", j, self.clock.time()))
            self.w.spawn(f"branch-{self.index}.{j}", self.branch(par_id, j, finished))
            running += 1
            yield None
        while running:
            yield lambda: bool(finished)
            j, done = finished.popleft()
            running -= 1
            outbox.add(done)
            assert isinstance(done.result, bytes)
            values[j] = pickle.loads(done.result)
        yield None
        outbox.add(base._replace(status=OpStatus.SUCCEEDED, end_ts=self.clock.time(),
                                 extra={"completion_reason": CompletionReason.ALL_COMPLETED.value, "total": k}))
        return sum(values.values()) + 1000 * len(values)

    def branch(self, par_id: str, j: int, finished: deque[tuple[int, OpRecord]]) -> Program:
        branch_id = operation_id(par_id, j)
        value = yield from self.step(branch_id, operation_id(branch_id, 1), f"branch-{j}-step",
                                     100 * self.index + j, True)
        yield None
        finished.append((j, OpRecord(branch_id, par_id, OpType.CONTEXT, SUB_BRANCH, f"branch-{j}",
                                     OpStatus.SUCCEEDED, self.clock.time(), self.clock.time(),
                                     pickle.dumps(value), attempt=1)))


# -- the driver side ------------------------------------------------------------------------------

class SimPool:
    """What the dispatcher uses of ``pool.WorkerPool``."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.workers: list[SimWorker] = []

    def __len__(self) -> int:
        return len(self.workers)

    def spawn(self) -> SimWorker:
        worker = SimWorker(self.sim, next(self.sim.pids), self.sim.outbox_class)
        worker.move(WorkerState.IDLE)
        self.workers.append(worker)
        self.sim.live.append(worker)
        return worker

    def reap(self, worker: SimWorker) -> Death:
        if worker in self.workers:
            self.workers.remove(worker)
        if worker.status is not WorkerState.DEAD:
            worker.move(WorkerState.DEAD)
        worker.die()
        return Death(worker.pid, KILLED, 0)

    def kill(self, worker: SimWorker) -> Death:
        if worker.status is not WorkerState.DEAD and worker.status is not WorkerState.DRAINING:
            worker.move(WorkerState.DRAINING)
        return self.reap(worker)


class SimClock:
    """The only clock the simulated engine reads (``time`` in worker and dispatcher)."""

    EPOCH = 1_800_000_000.0

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.EPOCH + self.now

    def process_time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Outcome:
    """The map's result as the store keeps it: reason and (status, value) per item."""

    reason: str
    items: tuple[tuple[str, Any], ...]


class Sim:
    """One schedule: ``Sim(seed, profile).run()`` returns the outcome or raises ``Violation``."""

    def __init__(self, seed: int, profile: str = "mixed",
                 outbox_class: type[worker_module.Outbox] = worker_module.Outbox, ignore: Iterable[str] = (),
                 dispatcher_class: type[Dispatcher] = Dispatcher) -> None:
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}")
        self.seed = seed
        self.profile = profile
        self.rng = random.Random(seed)
        self.scenario = Scenario.draw(self.rng, profile)
        self.outbox_class = outbox_class
        self.dispatcher_class = dispatcher_class  # a deliberately broken one, in the tests of the checker
        self.ignore = frozenset(ignore)  # invariants only traced, not raised (to show what else catches a defect)
        self.clock = SimClock()
        self.checker = Checker(self)
        self.durable: dict[tuple[str, str], bytes] = {}
        self.store = SimStore(self, self.durable)
        self.pids = itertools.count(1000)
        self.live: list[SimWorker] = []
        self.deaths_left = self.scenario.deaths
        self.crashes_left = self.scenario.driver_crashes
        self.unwritable = False  # the disk refuses every write until the driver restarts
        self.commit_errors = 0  # failed commit attempts (retried)
        self.decoded: dict[bytes, OpRecord] = {}
        self.steps = 0
        self.trace: list[str] = []  # what happened, for replay checks and reports

    def record(self, data: Any) -> OpRecord:
        """``OpRecord.loads``, once per distinct record (the checks read every record many times)."""
        key = bytes(data)
        rec = self.decoded.get(key)
        if rec is None:
            rec = self.decoded[key] = OpRecord.loads(key)
        return rec

    # -- one schedule ----------------------------------------------------------------------------
    def run(self) -> Outcome:
        for module, name in PATCHED:
            if not hasattr(module, name):
                raise RuntimeError(f"the simulation replaces {module.__name__}.{name}, which is gone: update engine_sim")
        saved = [(module, name, getattr(module, name)) for module, name in PATCHED]
        replacements = {"wait": self.wait, "time": self.clock, "wire": SIM_WIRE}
        for module, name in PATCHED:
            setattr(module, name, replacements[name])
        quiet = logging.root.manager.disable
        logging.disable(logging.CRITICAL)  # deaths and failing items are the point here, not news
        try:
            while True:
                try:
                    outcome = self._drive()
                    break
                except (DriverCrash, CheckpointFailedError) as exc:
                    self.trace.append(f"driver restart ({type(exc).__name__})")
                    self._restart()
                except Violation:
                    raise
                except Exception as exc:  # noqa: BLE001 - any engine error is a finding, with its seed
                    raise Violation(self.seed, self.profile, INTERNAL,
                                    f"{type(exc).__name__}: {exc}") from exc
        finally:
            logging.disable(quiet)
            for module, name, value in saved:
                setattr(module, name, value)
        self._final_checks(outcome)
        return outcome

    def _drive(self) -> Outcome:
        """One driver lifetime: resume the map from the store and run it to its end."""
        store = self.store
        scenario = self.scenario
        view = store.view()
        raw = view.get(("", MAP_OP))
        map_rec = OpRecord.loads(raw) if raw is not None else None
        if map_rec is None or not map_rec.is_terminal:
            if map_rec is None:
                map_rec = OpRecord(MAP_OP, "", OpType.CONTEXT, SUB_MAP, "sim-map", OpStatus.STARTED, self.clock.time())
                store.stage(EXEC_ID, map_rec)
                records: dict[int, Any] = {}
            else:
                keys = {branch_key(i): i for i in range(scenario.n)}
                records = {keys[key]: data for (parent, key), data in view.items() if parent == MAP_OP}
            done, done_ok, unfinished = split_terminal(records)
            spec = BatchSpec(op_id=MAP_OP, sub_type=SUB_MAP, item_sub_type=SUB_ITEM, name="sim-map", n=scenario.n,
                             names=None, funcs=None, func=sim_item, inputs=list(range(scenario.n)), item_serdes=None,
                             max_concurrency=scenario.max_concurrency, branch_timeout=None,
                             policy=CompletionPolicy(self.completion_config(), scenario.n), execution_id=EXEC_ID, done=done,
                             resuming=raw is not None, unfinished=unfinished, done_ok=done_ok)
            dispatcher = self.dispatcher_class(store, EXEC_ID, SimPool(self), max_workers=scenario.max_workers,  # type: ignore[arg-type]
                                    max_worker_memory=None)
            dispatcher.ncpu = scenario.max_workers
            _, reason = dispatcher.run_batch(spec)
            store.stage(EXEC_ID, map_rec._replace(status=OpStatus.SUCCEEDED, end_ts=self.clock.time(),
                                                  extra={"completion_reason": reason.value}))
        store.flush()
        return self._outcome()

    def completion_config(self) -> CompletionConfig | None:
        """Fail-fast (the default) without failing items; else exactly as many failures as will happen are tolerated."""
        failures = sum(self.scenario.failing)
        return CompletionConfig(tolerated_failure_count=failures) if failures else None

    def _restart(self) -> None:
        for worker in list(self.live):
            worker.die()
        self.store.crashed = True
        self.unwritable = False
        self.store = SimStore(self, self.durable)
        self.checker.rebuild(self.durable)

    def _outcome(self) -> Outcome:
        map_rec = OpRecord.loads(self.durable[("", MAP_OP)])
        items = []
        for index in range(self.scenario.n):
            data = self.durable.get((MAP_OP, branch_key(index)))
            if data is None:
                items.append(("MISSING", None))
                continue
            rec = self.record(data)
            items.append((rec.status, success_value(data) if rec.status == OpStatus.SUCCEEDED else None))
        return Outcome((map_rec.extra or {}).get("completion_reason", "?"), tuple(items))

    def expected(self) -> Outcome:
        return Outcome(CompletionReason.ALL_COMPLETED.value,
                       tuple((OpStatus.FAILED, None) if failing else (OpStatus.SUCCEEDED, expected_value(i, nested))
                             for i, (nested, failing) in enumerate(zip(self.scenario.nested, self.scenario.failing,
                                                                        strict=True))))

    def _final_checks(self, outcome: Outcome) -> None:
        expected = self.expected()
        if outcome != expected:
            wrong = [(i, got, want) for i, (got, want) in enumerate(zip(outcome.items, expected.items, strict=True))
                     if got != want]
            self.checker.fail(RESULT,
                              f"reason {outcome.reason} (expected {expected.reason}); items (index, got, expected): "
                              f"{wrong[:4]}")
        left = [self.record(data) for data in self.durable.values()]
        unfinished = [r for r in left if not r.is_terminal]
        if unfinished:
            self.checker.fail(LEFT_OPEN,
                              ", ".join(f"{r.sub_type} {r.name!r} {r.status}" for r in unfinished[:4]))

    # -- the scheduler -----------------------------------------------------------------------------
    def wait(self, handles: list[Any], timeout: float | None = None) -> list[Any]:
        """``multiprocessing.connection.wait`` for the dispatcher: run the world until a handle is ready."""
        rng = self.rng
        while True:
            self.steps += 1
            if self.steps > MAX_STEPS:
                self.checker.fail("no progress", f"{MAX_STEPS} scheduler steps")
            actions = self._actions()
            if not actions or rng.random() < DRIVER_WAKES:  # the driver may wake if a handle is ready
                ready = [h for h in handles if h.ready()]
                if ready:
                    return ready
                if not actions:
                    self.checker.fail("deadlock", "the driver waits and nothing can run")
            act, arg = rng.choice(actions)
            act(arg)

    def _actions(self) -> list[Action]:
        actions: list[Action] = []
        writes: list[Action] = []
        for worker in self.live:
            worker.actions(actions, writes)
        rng = self.rng
        # a send in flight is offered less often than other work: the windows it opens stay open longer
        actions.extend(w for w in writes if not actions or rng.random() < SLOW_WRITE)
        if not actions:  # nothing runs: only time may unblock someone (a sleeping flusher)
            if any(worker.flusher_wakes is not None for worker in self.live):
                actions.append((self._tick, None))
            return actions
        roll = rng.random()
        if roll < 0.25:
            actions.append((self._tick, None))
        if roll < 0.5 and self.store.group.busy():
            actions.append((self._commit, None))
        if self.deaths_left and roll < 0.04:
            actions.append((self._kill, rng.choice(self.live)))
        if self.crashes_left and roll < 0.004:
            actions.append((self._crash, None))
        return actions

    def _commit(self, _: None) -> None:
        self.store.group.committer_step()

    def _tick(self, _: None) -> None:
        self.clock.now += self.rng.choice(TICKS)

    def _kill(self, worker: SimWorker) -> None:
        self.deaths_left -= 1
        self.trace.append(f"kill worker {worker.pid} at item {worker.index_view[0]}")
        worker.die()

    def _crash(self, _: None) -> None:
        self.crashes_left -= 1
        self.trace.append("driver crash")
        self.store.crashed = True
        raise DriverCrash("simulated SIGKILL of the driver")

    def maybe_fail_commit(self) -> None:
        """A commit attempt: usually written; sometimes an I/O error (retried), rarely an unwritable disk."""
        if not self.scenario.commit_failures:
            return
        if self.unwritable:
            raise OSError("simulated full disk")
        roll = self.rng.random()
        if roll < 0.15:
            self.commit_errors += 1
            raise OSError("simulated I/O error")
        if roll < 0.17 and self.crashes_left:  # every attempt of this commit fails: the store latches
            self.crashes_left -= 1
            self.unwritable = True
            self.trace.append("store unwritable")
            raise OSError("simulated full disk")


def run_schedules(seeds: Iterable[int], profile: str, stop_at_first: bool = True, **kwargs: Any) -> list[Violation]:
    """Run the schedules of ``seeds`` (``kwargs`` go to ``Sim``); return the violations found
    (the first only if ``stop_at_first``)."""
    found: list[Violation] = []
    for seed in seeds:
        try:
            Sim(seed, profile, **kwargs).run()
        except Violation as violation:
            found.append(violation)
            if stop_at_first:
                break
    return found


def main(argv: list[str]) -> None:
    """Replay one schedule: ``python tests/engine/engine_sim.py SEED [PROFILE] [--ignore NAME ...]``.

    ``NAME`` is an invariant's constant (``OUT_OF_ORDER``, ``NO_CHECKPOINTS``, ...): it is only
    traced, so the replay shows what else the defect leads to.
    """
    ignore = [INVARIANTS[name] for name in argv[argv.index("--ignore") + 1:]] if "--ignore" in argv else []
    args = argv[: argv.index("--ignore")] if "--ignore" in argv else argv
    sim = Sim(int(args[0]), args[1] if len(args) > 1 else "mixed", ignore=ignore)
    print(sim.scenario)
    try:
        print(sim.run())
    finally:
        print("\n".join(sim.trace))


if __name__ == "__main__":
    main(sys.argv[1:])
