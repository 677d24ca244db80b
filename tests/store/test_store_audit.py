"""The store-level invariant checker (``durable_mp.store.audit``) on hand-built stores and a real run.

Each bad store breaks exactly one invariant and must be reported by that rule; each
good store holds a state the design allows (every named exception in ``ALLOWED``) and
must be reported clean.
"""

from __future__ import annotations

import os
import time

import pytest

import durable_mp.cli.main as cli
from durable_mp import ParallelBranch, durable_execution
from durable_mp.config import ChildConfig, CompletionConfig, Duration, MapConfig, NestingType, ParallelConfig
from durable_mp.core.records import OpRecord, OpStatus, OpType, branch_key, operation_id
from durable_mp.store import Store
from durable_mp.store.audit import (
    ALLOWED,
    ID_NOT_DERIVED,
    NO_OUTCOME,
    ORPHAN,
    UNFINISHED_IN_SUCCEEDED_EXECUTION,
    UNFINISHED_UNDER_TERMINAL,
    audit,
)
from durable_mp.store.records import FAILED, RUNNING, SUCCEEDED, ExecutionRecord

EXEC = "audited"
OK = b"\x80\x05K\x01."  # pickle of 1
ERROR = {"ErrorType": "ValueError", "ErrorMessage": "no"}
CRASHED = {"ErrorType": "durable_mp.exceptions.WorkerCrashedError", "ErrorMessage": "died"}


def op(op_id, parent, op_type=OpType.STEP, sub_type="Step", status=OpStatus.SUCCEEDED, name=None, **fields):
    if status == OpStatus.SUCCEEDED and op_type not in (OpType.WAIT,) and "result" not in fields \
            and sub_type not in ("Parallel", "Map"):
        fields["result"] = OK
    if status == OpStatus.FAILED and "error" not in fields:
        fields["error"] = ERROR
    return OpRecord(op_id, parent, op_type, sub_type, name or sub_type.lower(), status, time.time(), **fields)


def root(n):
    return operation_id("", n)


def batch(op_id, parent="", reason="ALL_COMPLETED", total=2, status=OpStatus.SUCCEEDED, flat=False, sub="Parallel"):
    extra = {"completion_reason": reason, "total": total} if status == OpStatus.SUCCEEDED else {}
    if flat:
        extra["nesting"] = "FLAT"
    return op(op_id, parent, OpType.CONTEXT, sub, status, extra=extra or None)


def branch(batch_id, index, status=OpStatus.SUCCEEDED, sub="ParallelBranch", **fields):
    return op(operation_id(batch_id, index), batch_id, OpType.CONTEXT, sub, status, name=f"b{index}", **fields)


def build(path, records, rows=(), status=SUCCEEDED):
    """A store holding ``records`` (keyed by op id) and batch item ``rows`` (keyed by index)."""
    now = time.time()
    with Store(path) as st:
        st.put_execution(ExecutionRecord(EXEC, status, "jobs:handler", None, OK if status == SUCCEEDED else None,
                                         None, now, now, now, 0, 0.0, 1))
        for rec in records:
            st.stage(EXEC, rec)
        for index, rec in rows:
            st.stage_raw(EXEC, rec.parent_id, branch_key(index), rec.dumps())
        st.flush()
    with Store(path, readonly=True) as st:
        return audit(st, EXEC)


def well_formed():
    """Root step, child context with a step, a parallel of two branches each with a step."""
    par = root(3)
    records = [op(root(1), ""), op(root(2), "", OpType.CONTEXT, "RunInChildContext"),
               op(operation_id(root(2), 1), root(2)), batch(par),
               op(operation_id(operation_id(par, 0), 1), operation_id(par, 0)),
               op(operation_id(operation_id(par, 1), 1), operation_id(par, 1))]
    return records, [(0, branch(par, 0)), (1, branch(par, 1))]


def rules(found):
    return sorted(v.rule for v in found)


# -- good stores: clean ----------------------------------------------------------------------

def test_a_well_formed_execution_is_clean(tmp_path):
    records, rows = well_formed()
    assert build(str(tmp_path / "s"), records, rows) == []


def test_a_batch_completed_by_successes_may_leave_its_running_branches_started(tmp_path):
    par = root(1)
    left = operation_id(par, 1)
    records = [batch(par, reason="MIN_SUCCESSFUL_REACHED"), op(operation_id(left, 1), left, status=OpStatus.STARTED)]
    rows = [(0, branch(par, 0)), (1, branch(par, 1, OpStatus.STARTED))]
    assert build(str(tmp_path / "s"), records, rows) == []
    assert "early-completion-by-success" in ALLOWED


def test_a_flat_batch_completed_by_successes_may_leave_its_branches_operations_started(tmp_path):
    par = root(1)
    records = [batch(par, reason="MIN_SUCCESSFUL_REACHED", flat=True, sub="Map"),
               op(operation_id(operation_id(par, 0), 1), par),
               op(operation_id(operation_id(par, 1), 1), par, status=OpStatus.STARTED)]
    rows = [(0, branch(par, 0, sub="MapIteration")), (1, branch(par, 1, OpStatus.STARTED, sub="MapIteration"))]
    assert build(str(tmp_path / "s"), records, rows) == []


def test_virtual_child_contexts_unawaited_callbacks_and_waits_are_clean(tmp_path):
    virtual = root(2)  # ChildConfig(is_virtual=True): records nothing, its operations sit under root
    records = [op(root(1), "", OpType.WAIT, "Wait"),
               op(operation_id(virtual, 1), ""), op(operation_id(operation_id(virtual, 2), 1), ""),
               op(root(3), "", OpType.CALLBACK, "Callback", OpStatus.STARTED)]
    assert build(str(tmp_path / "s"), records) == []


def test_a_branch_whose_worker_crashed_may_keep_its_step_started(tmp_path):
    par = root(1)
    crashed = operation_id(par, 1)
    records = [batch(par), op(operation_id(crashed, 1), crashed, status=OpStatus.STARTED)]
    rows = [(0, branch(par, 0)), (1, branch(par, 1, OpStatus.FAILED, error=CRASHED))]
    assert build(str(tmp_path / "s"), records, rows) == []


def nested_batch(reason="MIN_SUCCESSFUL_REACHED"):
    """A parallel whose one branch runs a map on the worker's threads: its items are keyed by op id."""
    par = root(1)
    outer = operation_id(par, 0)
    inner = operation_id(outer, 1)
    records = [batch(par, total=1), batch(inner, outer, reason=reason, sub="Map"),
               branch(inner, 0, sub="MapIteration"), branch(inner, 1, OpStatus.STARTED, sub="MapIteration")]
    return inner, records, [(0, branch(par, 0))]


def test_a_nested_batch_whose_items_are_keyed_by_id_is_clean(tmp_path):
    inner, records, rows = nested_batch()
    assert build(str(tmp_path / "s"), records, rows) == []


def test_a_nested_batch_item_at_an_id_no_index_gives(tmp_path):
    inner, records, rows = nested_batch()
    stray = op("c" * 64, inner, OpType.CONTEXT, "MapIteration")
    found = build(str(tmp_path / "s"), records + [stray], rows)
    assert rules(found) == [ID_NOT_DERIVED], found
    assert found[0].op_id == "c" * 64


def test_a_nested_batch_ended_by_failures_with_a_started_item(tmp_path):
    inner, records, rows = nested_batch("FAILURE_TOLERANCE_EXCEEDED")
    found = build(str(tmp_path / "s"), records, rows)
    assert rules(found) == [UNFINISHED_UNDER_TERMINAL], found
    assert found[0].op_id == operation_id(inner, 1)


def test_a_running_pool_item_has_no_record_yet_while_its_operations_do(tmp_path):
    """Found by the chaos test after a driver death: items the pool runs record themselves at their end."""
    par = root(1)
    running = operation_id(par, 5)
    records = [batch(par, status=OpStatus.STARTED, sub="Map"), op(operation_id(running, 1), running)]
    assert build(str(tmp_path / "s"), records, [(0, branch(par, 0, sub="MapIteration"))], status=RUNNING) == []


def test_an_item_of_a_finished_batch_without_its_record(tmp_path):
    par = root(1)
    lost = operation_id(par, 1)
    records = [batch(par, total=2, sub="Map"), op(operation_id(lost, 1), lost)]
    found = build(str(tmp_path / "s"), records, [(0, branch(par, 0, sub="MapIteration"))], status=RUNNING)
    assert rules(found) == [ORPHAN], found


def test_a_running_execution_may_have_unfinished_operations(tmp_path):
    records = [op(root(1), ""), op(root(2), "", status=OpStatus.STARTED)]
    assert build(str(tmp_path / "s"), records, status=RUNNING) == []


# -- bad stores: each violation found, by its rule ---------------------------------------------

def test_a_record_whose_parent_is_missing(tmp_path):
    records, rows = well_formed()
    lost = operation_id("0" * 64, 1)
    found = build(str(tmp_path / "s"), records + [op(lost, "0" * 64)], rows)
    assert rules(found) == [ORPHAN], found
    assert found[0].op_id == lost


def test_an_id_the_derivation_does_not_give(tmp_path):
    records, rows = well_formed()
    found = build(str(tmp_path / "s"), records + [op("f" * 64, "")], rows)
    assert rules(found) == [ID_NOT_DERIVED], found
    assert found[0].op_id == "f" * 64


def test_an_item_row_at_the_wrong_index(tmp_path):
    par = root(1)
    found = build(str(tmp_path / "s"), [batch(par)], [(0, branch(par, 0)), (1, branch(par, 0))])
    assert rules(found) == [ID_NOT_DERIVED], found


def test_a_nested_branch_started_under_a_succeeded_parallel(tmp_path):
    """Defect 2 of issue 18: an older STARTED overwrote a newer SUCCEEDED."""
    par = root(1)
    found = build(str(tmp_path / "s"), [batch(par)], [(0, branch(par, 0)), (1, branch(par, 1, OpStatus.STARTED))])
    assert rules(found) == [UNFINISHED_UNDER_TERMINAL], found
    assert found[0].op_id == operation_id(par, 1)


def test_a_started_branch_under_a_batch_ended_by_failures(tmp_path):
    par = root(1)
    rows = [(0, branch(par, 0, OpStatus.FAILED)), (1, branch(par, 1, OpStatus.STARTED))]
    found = build(str(tmp_path / "s"), [batch(par, reason="FAILURE_TOLERANCE_EXCEEDED")], rows)
    assert rules(found) == [UNFINISHED_UNDER_TERMINAL], found


def test_a_started_step_under_a_succeeded_branch_of_an_early_completed_batch(tmp_path):
    par = root(1)
    done = operation_id(par, 0)
    records = [batch(par, reason="MIN_SUCCESSFUL_REACHED"), op(operation_id(done, 1), done, status=OpStatus.STARTED)]
    found = build(str(tmp_path / "s"), records, [(0, branch(par, 0))])
    assert rules(found) == [UNFINISHED_UNDER_TERMINAL], found


def test_a_started_step_under_a_branch_that_failed_by_its_own_error(tmp_path):
    par = root(1)
    failed = operation_id(par, 0)
    records = [batch(par, total=1), op(operation_id(failed, 1), failed, status=OpStatus.STARTED)]
    found = build(str(tmp_path / "s"), records, [(0, branch(par, 0, OpStatus.FAILED))])
    assert rules(found) == [UNFINISHED_UNDER_TERMINAL], found


def test_a_started_operation_in_a_succeeded_execution(tmp_path):
    found = build(str(tmp_path / "s"), [op(root(1), ""), op(root(2), "", status=OpStatus.PENDING)])
    assert rules(found) == [UNFINISHED_IN_SUCCEEDED_EXECUTION], found


@pytest.mark.parametrize("status, fields", [(OpStatus.SUCCEEDED, {"result": None}),
                                            (OpStatus.FAILED, {"error": None})])
def test_a_terminal_record_without_its_outcome(tmp_path, status, fields):
    found = build(str(tmp_path / "s"), [op(root(1), "", status=status, **fields)], status=FAILED)
    assert rules(found) == [NO_OUTCOME], found


def test_several_violations_are_all_reported(tmp_path):
    par = root(1)
    records = [batch(par), op("e" * 64, ""), op(operation_id("a" * 64, 1), "a" * 64)]
    found = build(str(tmp_path / "s"), records, [(0, branch(par, 0, OpStatus.STARTED))])
    assert rules(found) == sorted([UNFINISHED_UNDER_TERMINAL, ID_NOT_DERIVED, ORPHAN]), found


# -- a real execution, and the CLI --------------------------------------------------------------

def _slow(ctx):
    return ctx.step(lambda s: time.sleep(30), name="slow")


def _fast(ctx):
    return ctx.step(lambda s: "fast", name="fast")


def _die(ctx):
    return ctx.step(lambda s: os._exit(3), name="die")


def _item(ctx, x, i, xs):
    return ctx.step(lambda s: x * 2, name=f"item-{i}")


def _virtual(ctx):
    return (ctx.step(lambda s: 1, name="in-virtual"), ctx.run_in_child_context(_fast, name="in-virtual-child"))


@durable_execution
def everything(event, ctx):
    ctx.step(lambda s: None, name="none")
    ctx.wait(Duration.from_seconds(1))
    ctx.run_in_child_context(_virtual, name="virtual", config=ChildConfig(is_virtual=True))
    ctx.map([1, 2, 3], _item, name="flat", config=MapConfig(nesting_type=NestingType.FLAT))
    ctx.map([1, 2, 3], lambda c, x, i, xs: None, name="plain")
    ctx.create_callback(name="unawaited")
    first = ParallelConfig(completion_config=CompletionConfig.first_successful())
    ctx.parallel([ParallelBranch(_fast), ParallelBranch(_slow)], name="first", config=first)
    ctx.parallel([_fast, _die], name="crash")
    return "done"


@pytest.mark.timeout(120)
def test_a_real_execution_with_every_allowed_exception_is_clean_and_the_cli_says_so(tmp_path, capsys):
    store = str(tmp_path / "s")
    assert everything.run(None, execution_id=EXEC, store=store, skip_time=True, max_crash_retries=1) == "done"
    with Store(store, readonly=True) as st:
        statuses = sorted(r.status for r in st.ops(EXEC))
        assert audit(st, EXEC) == []
    assert "STARTED" in statuses and "FAILED" in statuses  # the exceptions were really exercised
    assert cli.main(["check", EXEC, "--store", store]) == 0
    assert "all invariants hold" in capsys.readouterr().err


def test_the_cli_prints_each_violation_and_exits_1(tmp_path, capsys):
    par = root(1)
    store = str(tmp_path / "s")
    build(store, [batch(par), op("e" * 64, "")], [(0, branch(par, 0)), (1, branch(par, 1, OpStatus.STARTED))])
    assert cli.main(["check", EXEC, "--store", store]) == 1
    out, err = capsys.readouterr()
    assert out.count("\n") == 2 and UNFINISHED_UNDER_TERMINAL in out and ID_NOT_DERIVED in out
    assert "2 invariant violation(s)" in err
