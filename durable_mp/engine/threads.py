"""Nested parallel/map inside a worker: branches run on threads of that worker.

Only top-level batches fan out to processes; a batch inside a branch already occupies a
worker slot, and sending its branches back to the pool could deadlock a full pool.
Threads match the reference's model (I/O-bound nested branches overlap).  Completion
follows docs/architecture.md "Completion" as in the dispatcher: failures stop the starting of branches and
let the running ones finish; successes end the batch at once.  A thread cannot be
killed: a branch still running then is recorded STARTED, its state is cancelled, and
its next durable operation raises ``OrphanedChildException`` so nothing it does
afterwards is checkpointed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Any

from durable_mp.core.completion import CompletionReason
from durable_mp.core.records import OpRecord, OpStatus
from durable_mp.core.spec import BatchSpec
from durable_mp.engine.branch import (
    BranchSource,
    failed_record,
    raise_if_fatal,
    run_branch,
    slept_seconds,
    started_record,
)
from durable_mp.engine.state import add_slept_seconds
from durable_mp.engine.virtual_clock import VirtualClock
from durable_mp.exceptions import OrphanedChildException


def run_batch_in_threads(state: Any, spec: BatchSpec) -> tuple[dict[int, OpRecord], Any]:
    policy = spec.policy
    records: dict[int, OpRecord] = spec.replay_done()
    source = BranchSource(funcs=spec.funcs, func=spec.func, inputs=spec.inputs, item_serdes=spec.item_serdes,
                          batch_op_id=spec.op_id, item_sub_type=spec.item_sub_type, names=spec.names,
                          execution_id=spec.execution_id, flat=spec.flat)
    todo = deque(i for i in range(spec.n) if i not in records)
    limit = spec.max_concurrency or max(1, len(todo))
    finished: queue.Queue[tuple[int, OpRecord]] = queue.Queue()
    running: dict[int, tuple[Any, float]] = {}
    clock = VirtualClock() if spec.skip_time else None  # skip_time: outcomes ordered after their sleeps

    def body(index: int, branch_state: Any) -> None:
        start = time.time()
        try:
            rec = run_branch(source, index, branch_state.context)
        except OrphanedChildException:
            return
        except BaseException as exc:  # noqa: BLE001 - the batch waits for every branch it started: one must not vanish
            rec = failed_record(source, index, start, exc)
        finished.put((index, rec))

    def collect() -> None:
        if clock is not None and clock.may_release(bool(running)):  # one outcome at its virtual time
            count(*clock.release())
            return
        try:
            index, rec = finished.get(timeout=clock.seconds_to_next() if clock is not None else None)
        except queue.Empty:  # a held outcome's end came while branches ran
            return
        running.pop(index, None)
        if isinstance(rec.result, list):  # serdes.Parts: join once, the record stays in this process
            rec = rec._replace(result=b"".join(rec.result))
        if clock is not None and not (rec.extra or {}).get("fatal"):  # a fatal error ends the execution at once
            clock.hold(index, slept_seconds(rec), rec)  # it keeps its slot until its time comes
            return
        count(index, rec)

    def count(index: int, rec: OpRecord) -> None:
        records[index] = rec
        state.emit(rec)
        raise_if_fatal(rec)
        policy.on_finished(index, rec.status == OpStatus.SUCCEEDED)

    def slots_used() -> int:
        return len(running) + (len(clock) if clock is not None else 0)

    reason = policy.decision()
    while reason is None:
        while todo and slots_used() < limit and policy.decision() is None:
            index = todo.popleft()
            branch_state = state.for_branch()
            policy.on_started(index)
            start = time.time()
            running[index] = (branch_state, start)
            # recorded at once, so the branch's operations hang off a known parent (a re-dispatched
            # worker finds a step its driver timed out, and history has the branch's start)
            state.emit(started_record(spec.op_id, spec.item_sub_type, source.name(index), index, start))
            threading.Thread(target=body, args=(index, branch_state), daemon=True,
                             name=f"durable_mp-branch-{index}").start()
        collect()
        reason = policy.decision()
    if reason is CompletionReason.FAILURE_TOLERANCE_EXCEEDED:
        while running or clock:  # failures: the running (and sleeping) branches finish and report
            collect()
        ended = all(index in records for index in range(spec.n))
        reason = CompletionReason.ALL_COMPLETED if ended else reason
    elif clock is not None:  # successes: the branches still sleeping were running then
        for index in clock.still_sleeping():
            records[index] = started_record(spec.op_id, spec.item_sub_type, source.name(index), index, time.time())
            state.emit(records[index])
    for index, (branch_state, start) in running.items():
        branch_state.cancel()
        rec = started_record(spec.op_id, spec.item_sub_type, source.name(index), index, start)
        records[index] = rec
        state.emit(rec)
    if clock is not None:  # the batch's virtual duration is its caller's: it orders the caller's outcome
        add_slept_seconds(clock.skipped)
    return records, reason
