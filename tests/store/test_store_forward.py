"""The store refuses a record moving backwards (docs/architecture.md "Invariants"; issue 18).

A record's status only moves forward: STARTED → PENDING → terminal, a step's retry in
(attempt, status) order.  The only way back is ``Store.reopen`` (fix-and-resume).  A
refused write is never applied, and the refusal latches: every later stage and flush
raises it.
"""

from __future__ import annotations

import pytest

from durable_mp.core.records import OpRecord, OpStatus, OpType, item_prefix, item_record
from durable_mp.store.facade import Store
from durable_mp.store.forward import RecordMovedBackwards, backwards

pytestmark = pytest.mark.timeout(60)


def step(status: str, attempt: int = 1, result=None, op_id: str = "s") -> OpRecord:
    return OpRecord(op_id, "p", OpType.STEP, "Step", "step", status, 1.0, None, result, attempt=attempt)


def context(status: str, op_id: str = "c") -> OpRecord:
    return OpRecord(op_id, "p", OpType.CONTEXT, "RunInChildContext", "child", status, 1.0)


def item(index: int, result: bytes) -> bytes:
    parent, sub = item_prefix("p", "MapIteration")
    return item_record(f"op{index}", parent, sub, f"map-item-{index}", 1.0, 2.0, 7, result)


@pytest.fixture
def store(tmp_path):
    st = Store(tmp_path / "s")
    yield st
    try:
        st.close()
    except RecordMovedBackwards:
        pass  # the refusal stays latched through close: loud to the end


def test_forward_moves_are_allowed_and_backward_ones_named():
    ok = [(step(OpStatus.STARTED), step(OpStatus.PENDING)),
          (step(OpStatus.PENDING, 1), step(OpStatus.STARTED, 2)),  # a retry is a new attempt
          (step(OpStatus.STARTED, 2), step(OpStatus.SUCCEEDED, 2)),
          (step(OpStatus.PENDING, 1), step(OpStatus.PENDING, 2)),
          (context(OpStatus.STARTED), context(OpStatus.STARTED)),
          (step(OpStatus.SUCCEEDED, result=b"x"), step(OpStatus.SUCCEEDED, result=b"x"))]  # the same record again
    for old, new in ok:
        assert backwards(old.dumps(), new.dumps()) is None, (old.status, new.status)
    bad = [(step(OpStatus.SUCCEEDED), step(OpStatus.STARTED)),
           (step(OpStatus.SUCCEEDED, result=b"a"), step(OpStatus.SUCCEEDED, result=b"b")),
           (step(OpStatus.FAILED), step(OpStatus.SUCCEEDED)),
           (step(OpStatus.PENDING, 1), step(OpStatus.STARTED, 1)),
           (step(OpStatus.STARTED, 2), step(OpStatus.PENDING, 1)),
           (context(OpStatus.SUCCEEDED), context(OpStatus.STARTED))]
    for old, new in bad:
        assert backwards(old.dumps(), new.dumps()) is not None, (old.status, new.status)
    assert backwards(item(1, b"a"), context(OpStatus.STARTED).dumps()) is not None  # compact items are terminal
    assert backwards(item(1, b"a"), item(1, b"a")) is None


def test_an_older_record_staged_over_a_newer_staged_one_is_refused_and_not_applied(store):
    store.stage("e", step(OpStatus.SUCCEEDED, result=b"done"))
    with pytest.raises(RecordMovedBackwards, match="SUCCEEDED -> STARTED"):
        store.stage("e", step(OpStatus.STARTED))  # issue 18 defect 2: STARTED arriving after SUCCEEDED
    assert store.get_op("e", "p", "s").status == OpStatus.SUCCEEDED
    with pytest.raises(RecordMovedBackwards):  # latched: the execution cannot go on from here
        store.stage("e", step(OpStatus.SUCCEEDED, op_id="t"))


def test_an_older_record_over_a_committed_one_is_refused_by_the_commit(store, tmp_path):
    store.stage("e", step(OpStatus.SUCCEEDED, result=b"done"))
    store.stage("e", context(OpStatus.STARTED))
    store.flush()
    store.stage("e", step(OpStatus.STARTED))  # the newer record is committed: the commit finds it
    store.stage("e", context(OpStatus.SUCCEEDED))  # forward: written with it
    with pytest.raises(RecordMovedBackwards, match="e/p/s"):
        store.flush()
    with Store(tmp_path / "s", readonly=True) as reader:
        assert reader.get_op("e", "p", "s").status == OpStatus.SUCCEEDED
        assert reader.get_op("e", "p", "c").status == OpStatus.SUCCEEDED


def test_bulk_item_records_are_checked_against_earlier_ones(store):
    store.stage_items("e", "b", [0, 1, 2], [item(0, b"a"), item(1, b"b"), item(2, b"c")])
    store.stage_items("e", "b", [2, 3], [item(2, b"c"), item(3, b"d")])  # the same record again: fine
    with pytest.raises(RecordMovedBackwards, match="e/b/#000000000001"):
        store.stage_items("e", "b", [1], [item(1, b"other")])
    assert store.branch_raw("e", "b")[1] == item(1, b"b")


def test_a_reopen_is_the_one_way_back_and_is_counted(store):
    store.stage("e", step(OpStatus.FAILED))
    store.flush()
    reopened = step(OpStatus.PENDING)
    store.reopen("e", [("p", "s", reopened.dumps())])
    assert store.get_op("e", "p", "s").status == OpStatus.PENDING
    assert store.stats["reopened"] == 1
    store.stage("e", step(OpStatus.STARTED, 2))  # and it moves forward from there
    store.stage("e", step(OpStatus.SUCCEEDED, 2))
    store.flush()
    assert store.get_op("e", "p", "s").status == OpStatus.SUCCEEDED


def test_an_engine_bug_that_moves_a_record_back_stops_the_execution_loudly(store_path, monkeypatch):
    """End to end: a driver that re-stages a step's STARTED record after its SUCCEEDED one (as the
    outbox race of issue 18 defect 2 did) is stopped with the internal error; nothing is applied,
    and the execution stays RUNNING (resumable), as with an unwritable store."""
    from durable_mp import durable_execution
    from durable_mp.engine.driver import DriverState

    real_emit = DriverState.emit

    def emit_then_replay_an_older_record(self, rec, sync=False):
        real_emit(self, rec, sync)
        if rec.status == OpStatus.SUCCEEDED and rec.name == "first":
            real_emit(self, rec._replace(status=OpStatus.STARTED, end_ts=None, result=None))

    monkeypatch.setattr(DriverState, "emit", emit_then_replay_an_older_record)

    @durable_execution
    def handler(event, ctx):
        ctx.step(lambda s: "one", name="first")
        return ctx.step(lambda s: "two", name="second")

    with pytest.raises(RecordMovedBackwards, match="SUCCEEDED -> STARTED"):
        handler.run(None, store=store_path)
    with Store(store_path, readonly=True) as st:
        exec_id = handler.execution_id_for(None)
        steps = {r.name: r.status for r in st.ops(exec_id)}
        assert steps.get("first") == OpStatus.SUCCEEDED and "second" not in steps
        assert st.get_execution(exec_id).status == "RUNNING"
