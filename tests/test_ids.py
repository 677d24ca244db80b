"""Operation ids are the reference SDK's (so checkpoints line up operation by operation)."""

from __future__ import annotations

import pytest

from durable_mp import durable_execution
from durable_mp.core.records import OpRecord, operation_id
from durable_mp.store.facade import Store

# measured on the reference SDK 3.0.0 (reference doc, section 5)
ROOT_FIRST = "1ced8f5be2db"
BRANCH_0 = "1712f93e2f51"
STEP_IN_BRANCH_0 = "48550629202c"


def test_ids_match_the_reference():
    root = operation_id("", 1)
    assert root.startswith(ROOT_FIRST) and len(root) == 64
    branch = operation_id(root, 0)
    assert branch.startswith(BRANCH_0)
    assert operation_id(branch, 1).startswith(STEP_IN_BRANCH_0)


@pytest.mark.timeout(60)
def test_recorded_operations_carry_reference_ids_and_parents(store_path):
    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([lambda c: c.step(lambda _: 1, name="s"), lambda c: 2], name="p").get_results()

    assert handler.run(None, store=store_path) == [1, 2]
    with Store(store_path) as st:
        ops = {r.name: r for r in st.ops(handler.execution_id_for(None))}
    parallel, branch0, step = ops["p"], ops["parallel-branch-0"], ops["s"]
    assert parallel.op_id.startswith(ROOT_FIRST) and parallel.parent_id == ""
    assert (parallel.op_type, parallel.sub_type, parallel.status) == ("CONTEXT", "Parallel", "SUCCEEDED")
    assert branch0.op_id.startswith(BRANCH_0) and branch0.parent_id == parallel.op_id
    assert (branch0.sub_type, ops["parallel-branch-1"].sub_type) == ("ParallelBranch", "ParallelBranch")
    assert step.op_id.startswith(STEP_IN_BRANCH_0) and step.parent_id == branch0.op_id


def test_record_bytes_round_trip_every_result_kind():
    base = OpRecord("a" * 64, "", "STEP", "Step", "n", "SUCCEEDED", 1.0, 2.0)
    for result in (None, b"", b"\x00raw\xff" * 100, "text ✓", ""):
        rec = base._replace(result=result, attempts=((1, 1.0, 2.0, 7, None),), extra={"k": [1]})
        assert OpRecord.loads(rec.dumps()) == rec
