"""Record intake: what the workers report becomes branch state, policy counts and staged records.

The hot path of the driver.  Each ``Records`` / ``ChunkDone`` / ``SyncRequest`` message
is taken here in one call: the nested records are staged as the worker pickled them, the
branches it finished move in the batch's item table (which the completion policy counts), and their
records go to the store's group commit.  Under ``skip_time`` every outcome is first held
by the batch's virtual clock and counted when it is released (docs/architecture.md
"Completion").  The records the driver writes itself (a failed, abandoned or still
running branch) are written here too, so one place stages every branch record.
"""

from __future__ import annotations

import time
from typing import Any

from durable_mp.concurrency.models import BatchItemStatus
from durable_mp.core.item_probe import as_record
from durable_mp.core.records import OpRecord, OpStatus, OpType, branch_key, operation_id
from durable_mp.engine import progress as _progress
from durable_mp.engine.batch_run import BatchRun, Task
from durable_mp.engine.branch import FatalBranchError, slept_seconds, started_record
from durable_mp.engine.failures import NULL_FAILURE_LOG
from durable_mp.engine.lifecycle import WAITING, BranchState
from durable_mp.engine.protocol import NOT_SENT, Succeeded
from durable_mp.engine.result_blobs import UNDECODED, take
from durable_mp.engine.result_decode import UNREAD, success_value
from durable_mp.engine.scheduling import started_by_the_decision
from durable_mp.lambda_service import ErrorObject

_ENDED = (BranchState.SUCCEEDED, BranchState.FAILED)  # replayed from the store: never failed again


class Intake:
    """Takes the branch outcomes of every batch of one execution into its branch table, policy and store."""

    def __init__(self, store: Any, execution_id: str) -> None:
        self.store = store
        self.execution_id = execution_id
        self.bar: Any = _progress.NULL_BAR  # the running batch's progress bar
        self.failures: Any = NULL_FAILURE_LOG  # the running batch's FailureLog (each distinct failure once)
        self.reopened: dict[tuple[str, int], int] = {}  # (batch token, index) -> attempts before a re-run

    def continue_attempts(self, batch: BatchRun) -> None:
        """Branches a fix-and-resume re-run reopened (``core.reopen``) keep their earlier attempts.

        Only a reopened branch record is STARTED with attempts; its new record continues them.
        The resumed batch's unfinished records came with its spec: the finished ones are not decoded.
        """
        queued = set(batch.queue)
        for index, data in batch.spec.unfinished.items():
            rec = as_record(data)
            if index in queued and rec.status == OpStatus.STARTED and rec.attempts:
                batch.crash_log[index] = list(rec.attempts)
                self.reopened[(batch.token, index)] = rec.attempt

    # -- what a worker reports ------------------------------------------------------------------
    def take(self, task: Task | None, msg: Any) -> None:
        """A ``Records``, ``ChunkDone`` or ``SyncRequest``: stage its records, finish its branches."""
        self.stage_nested(msg.nested)
        if task is None or task.batch is None:
            return
        if msg.items:
            self.finish_items(task, msg.items)
        if msg.succeeded is not None:
            self.finish_succeeded(task, msg.succeeded)

    def chunk_done(self, task: Task, msg: Any) -> None:
        """A chunk ended: the branches it did not start go back; its time teaches the chunk size."""
        batch = task.batch
        if batch is None:
            return
        if msg.unstarted:
            self.return_unstarted(batch, msg.unstarted)
        ran = len(task.indices) - len(msg.unstarted)
        if ran:
            # the worker's own time for the chunk: a tiny item's round trip would
            # otherwise look like its cost and keep the chunks of a small map small
            batch.observe(msg.seconds or time.time() - task.started, ran, msg.cpu_share)

    def stage_nested(self, nested: list[Any]) -> None:
        """Records of operations inside branches (steps, nested batches), as the worker pickled them."""
        stage_raw = self.store.stage_raw
        for parent_id, op_id, data in nested:
            stage_raw(self.execution_id, parent_id, op_id, data)

    def finish_items(self, task: Task, items: list[Any], released: bool = False) -> None:
        """Hot path: one call per message, a few dict/set operations per finished branch.

        Under skip_time every outcome is held by the batch's virtual clock until its time
        (keeping its slot) and finished here when ``release_held`` releases it.
        """
        batch = task.batch
        assert batch is not None
        clock = None if released else batch.clock
        reported = task.reported
        if batch.closed:
            reported.update(item[0] for item in items)
            return
        records = batch.records
        finish = batch.branches.finish
        tick = None if self.bar is _progress.NULL_BAR else self.bar.item
        crash_log = batch.crash_log
        decode = batch.decode_results
        staged = []
        failed = 0
        held = 0  # outcomes the virtual clock holds: counted when released
        ok: list[int] = []  # succeeded: moved in the item table in one call
        for index, succeeded, key, data in items:
            value = UNDECODED
            if data[:1] == b"\0":  # a large result its worker wrote to the store: only its reference came
                data, value = take(self.store.path, self.execution_id, data)
            if crash_log and index in crash_log:  # rare: keep the deaths in the branch's record
                rec = OpRecord.loads(data)
                data = rec._replace(attempts=tuple(crash_log.pop(index)) + tuple(rec.attempts),
                                    attempt=rec.attempt + self.reopened.pop((batch.token, index), 0)).dumps()
            reported.add(index)
            if clock is not None:
                rec = OpRecord.loads(b"".join(data) if isinstance(data, list) else data)
                if not (rec.extra or {}).get("fatal"):  # a fatal error ends the execution at once
                    clock.hold(index, slept_seconds(rec), (task, (index, succeeded, key, data)))
                    held += 1
                    continue  # it keeps its slot until its time comes (``release_held``)
            staged.append((key, data))
            # keep the value, not the record: a big map's BatchResult fits in RAM; a record that
            # cannot be read here stays bytes (the BatchResult build reports it)
            if not (succeeded and decode):
                value = UNREAD
            elif value is UNDECODED:
                value = success_value(data)
            if value is UNREAD:
                records[index] = data
            else:
                records.set_item(index, BatchItemStatus.SUCCEEDED, value)
            if succeeded:
                ok.append(index)
            else:
                finish(index, BranchState.FAILED)
            if tick is not None:
                tick(succeeded)
            if not succeeded:
                failed += 1
                self.store.stage_many(self.execution_id, batch.spec.op_id, staged)
                staged = []
                rec = OpRecord.loads(data)
                if rec.extra and rec.extra.get("fatal"):
                    raise FatalBranchError(rec)
                self.failures.note(index, rec.error)
        if ok:
            batch.branches.finish_many(ok, BranchState.SUCCEEDED)
        self.store.stage_many(self.execution_id, batch.spec.op_id, staged)
        seen = task.seen
        if seen is not None:  # what this worker's budgets count as already known
            seen[0] += failed
            seen[1] += len(items) - failed - held

    def finish_succeeded(self, task: Task, done: Succeeded) -> None:
        """Hot path: plain successes as columns, a few C-level calls per message (``finish_items`` for the rest)."""
        batch = task.batch
        assert batch is not None
        indices = done.indices
        task.reported.update(indices)
        if batch.closed:
            return
        if batch.crash_log and not batch.crash_log.keys().isdisjoint(indices):  # rare: keep the deaths
            self.finish_items(task, [(i, True, branch_key(i), OpRecord.loads(data).dumps())
                                     for i, data in zip(indices, done.records, strict=False)])
            return
        if batch.clock is not None:  # skip_time: the virtual clock orders every outcome
            self.finish_items(task, [(i, True, branch_key(i), data)
                                     for i, data in zip(indices, done.records, strict=False)])
            return
        records = batch.records
        if batch.decode_results:  # keep the value, not the record: a big map's BatchResult fits in RAM
            values = done.values
            if NOT_SENT not in values:
                records.set_values(indices, values)
            else:  # decode here; a record that cannot be read here stays bytes (the BatchResult build reports it)
                for index, value, data in zip(indices, values, done.records, strict=True):
                    if value is NOT_SENT:
                        value = success_value(data)
                    if value is UNREAD:
                        records[index] = data
                    else:
                        records.set_value(index, value)
        else:
            records.update(zip(indices, done.records, strict=False))
        batch.branches.finish_many(indices, BranchState.SUCCEEDED)
        self.bar.succeeded(len(indices))
        self.store.stage_items(self.execution_id, batch.spec.op_id, indices, done.records)
        if task.seen is not None:  # what this worker's budgets count as already known
            task.seen[1] += len(indices)

    def return_unstarted(self, batch: BatchRun, indices: list[int]) -> None:
        """Branches a worker never started: pending again; queued again unless the batch stops."""
        requeue = not (batch.stopping or batch.closed or batch.spec.policy.is_decided)
        for index in indices:
            if batch.branches.state(index) is not BranchState.DISPATCHED:
                continue
            batch.branches.move(index, BranchState.PENDING)
        if requeue:
            batch.queue.extendleft(reversed([i for i in indices if batch.branches.state(i) is BranchState.PENDING]))

    def release_held(self, batch: BatchRun) -> None:
        """The earliest held outcome counts now (the clock skips to its end if every branch sleeps)."""
        assert batch.clock is not None
        _, (task, item) = batch.clock.release()
        self.finish_items(task, [item], released=True)

    # -- the records the driver writes itself ---------------------------------------------------
    def fail_unpicklable(self, batch: BatchRun, index: int, error: Exception) -> None:
        if batch.branches.state(index) in _ENDED:  # its record from an earlier run stands (a resume replays it)
            return
        if index in batch.queue:
            batch.queue.remove(index)
        self.fail_item(batch, index, error)

    def fail_item(self, batch: BatchRun, index: int, error: Exception, start: float | None = None,
                  pid: int = 0) -> None:
        spec = batch.spec
        now = time.time()
        attempts = tuple(batch.crash_log.pop(index, ()))
        rec = OpRecord(operation_id(spec.op_id, index), spec.op_id, OpType.CONTEXT, spec.item_sub_type,
                       spec.item_name(index), OpStatus.FAILED, start or now, now, None,
                       ErrorObject.from_exception(error).to_dict(), max(1, len(attempts)), attempts=attempts,
                       pid=pid)
        if batch.branches.state(index) in WAITING:
            if spec.policy.is_decided:
                return  # a branch that will never start (again) cannot fail
            batch.branches.move(index, BranchState.FAILED)
        else:
            batch.branches.finish(index, BranchState.FAILED)
        self.record_item(batch, index, rec)
        self.bar.item(False)
        self.failures.note(index, rec.error)

    def record_sleeping(self, batch: BatchRun) -> None:
        """Branches still sleeping when successes completed the batch (skip_time) were running then: STARTED."""
        assert batch.clock is not None
        self._record_running(batch, batch.clock.still_sleeping(), time.time())

    def record_started(self, batch: BatchRun, task: Task, indices: list[int]) -> None:
        """Branches still running when their batch completed early stay STARTED."""
        self._record_running(batch, indices, task.started)

    def _record_running(self, batch: BatchRun, indices: Any, started: float) -> None:
        spec = batch.spec
        for index in indices:
            if batch.branches.state(index) in (BranchState.DISPATCHED, BranchState.RUNNING):
                batch.branches.finish(index, BranchState.ABANDONED)
            self.record_item(batch, index, started_record(spec.op_id, spec.item_sub_type, spec.item_name(index),
                                                          index, started))

    def record_admitted(self, batch: BatchRun) -> None:
        """Items the batch had started by its decision (``started_by_the_decision``) that no worker
        began, because the pool is smaller than ``max_concurrency``: STARTED, as the reference reports them."""
        spec, policy = batch.spec, batch.spec.policy
        ended = policy.succeeded_count + policy.failed_count - 1  # before the deciding success
        admitted = started_by_the_decision(spec.n, ended, spec.max_concurrency)
        if admitted == spec.n and len(batch.records) >= spec.n:  # every item has its record: nothing to add
            return
        now = time.time()
        for index in range(admitted):
            if index not in batch.records:
                self.record_item(batch, index, started_record(spec.op_id, spec.item_sub_type,
                                                              spec.item_name(index), index, now))

    def record_item(self, batch: BatchRun, index: int, rec: OpRecord) -> None:
        """A branch record the driver writes itself (failure, abandoned) under the branch's key."""
        batch.records[index] = rec
        self.store.stage_raw(self.execution_id, batch.spec.op_id, branch_key(index), rec.dumps())
