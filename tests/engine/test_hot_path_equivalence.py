"""The worker's hot path computes ids, names and compact records its own way: they must equal the reference forms.

A map over tiny items builds its records with shortcuts (``branch_id_bytes``,
``ItemEncoder``, the inlined default name, ``stop_thresholds``).  Each is pinned here to
the plain function it stands for, over the inputs that could tell them apart, because a
stored id or record that changed would no longer replay.
"""

from __future__ import annotations

import hashlib
import itertools

import pytest

from durable_mp.core.records import (ItemEncoder, OpRecord, branch_id_bytes, branch_key, branch_key_list, item_prefix,
                                     item_record, operation_id)
from durable_mp.core.vocabulary import map_item_name
from durable_mp.engine.branch import BranchRunner, BranchSource
from durable_mp.engine.protocol import NOT_SENT, Budget
from durable_mp.engine.scheduling import NEVER, start_budget, stop_chunk, stop_thresholds
from durable_mp.engine.worker_state import WorkerContextState, WorkerShared

pytestmark = pytest.mark.process_free

PARENTS = [operation_id("", 1), operation_id(operation_id("", 3), 2), "p", "ünï-cødé"]
INDICES = [0, 1, 9, 10, 99, 1000, 65535, 2**31, 10**15]


@pytest.mark.parametrize("parent", PARENTS)
def test_branch_ids_are_the_reference_operation_ids(parent):
    prefix = f"{parent}-".encode()
    for index in INDICES:
        assert branch_id_bytes(prefix + b"%d" % index) == operation_id(parent, index).encode()


def test_an_operation_id_keeps_its_pinned_value():
    # the scheme of every stored record: blake2b-512 of "parent-n" (or "n" at the root), first 64 hex digits
    assert operation_id("", 1) == hashlib.blake2b(b"1").hexdigest()[:64]
    assert operation_id("abc", 7) == hashlib.blake2b(b"abc-7").hexdigest()[:64]


@pytest.mark.parametrize("parent,sub_type", [("p" * 64, "MapIteration"), ("", "ParallelBranch"), ("é", "x")])
def test_the_item_encoder_writes_item_record_bytes(parent, sub_type):
    prefix, sub = item_prefix(parent, sub_type)
    encoder = ItemEncoder(prefix, sub)
    for op, name, result in itertools.product(["o" * 64, "", "ö"], ["map-item-3", "", "naïve"],
                                              [None, "", '{"t":"i","v":3}', "é", b"", b"\x80\x00raw"]):
        expected = item_record(op, prefix, sub, name, 1.25, 2.5, 4321, result)
        assert encoder.record(op.encode(), name.encode(), 1.25, 2.5, 4321, result) == expected
        if isinstance(result, str):
            assert encoder.text(op.encode(), name.encode(), 1.25, 2.5, 4321, result) == expected
        rec = OpRecord.loads(expected)
        assert (rec.op_id, rec.parent_id, rec.name, rec.result) == (op, parent, name, result)


def test_stop_thresholds_stop_exactly_where_stop_chunk_stops():
    budgets = [Budget(None, None), start_budget(None, 2), start_budget(3, None), start_budget(1, 5, (2, 7)),
               start_budget(0, 0), start_budget(4, 1, (1, 0))]
    for budget in budgets:
        fail_at, success_at = stop_thresholds(budget)
        for failures, successes in itertools.product(range(12), range(12)):
            assert stop_chunk(budget, failures, successes) == (failures >= fail_at or successes >= success_at)
    assert stop_thresholds(Budget(None, None)) == (NEVER, NEVER)


def _runner(func=None, funcs=None, names=None, batch_op_id=None, item_serdes=None):
    batch_op_id = operation_id("", 1) if batch_op_id is None else batch_op_id
    inputs = list(range(30))
    source = BranchSource(funcs=funcs, func=func, inputs=inputs if func else None, item_serdes=item_serdes,
                          batch_op_id=batch_op_id, item_sub_type="MapIteration", names=names, execution_id="exec")
    state = WorkerContextState(WorkerShared(None, {"execution_id": "exec"}), {})
    return BranchRunner(source, state.context, compact=True)


def test_a_plain_map_item_record_is_what_the_reference_forms_give():
    seen = []

    def item(ctx, x, index, inputs):
        seen.append((ctx.operation_id, index))
        return x * 2

    runner = _runner(func=item)
    parent = operation_id("", 1)
    for index in [0, 7, 29]:
        data, value = runner.run(index)
        assert value == 2 * index
        rec = OpRecord.loads(data)
        assert rec.op_id == operation_id(parent, index) == seen[-1][0]
        assert rec.name == map_item_name(index) and rec.parent_id == parent and rec.status == "SUCCEEDED"
        assert rec.result == str(2 * index) and rec.sub_type == "MapIteration" and rec.attempt == 1
        assert rec.start_ts <= rec.end_ts


def test_names_that_a_compact_record_cannot_hold_give_the_full_record():
    funcs = [lambda ctx: 1] * 3
    runner = _runner(funcs=funcs, names=["\ud800bad", "", "fine"])
    bad, value = runner.run(0)
    assert isinstance(bad, OpRecord) and bad.name == "\ud800bad" and bad.result == "1" and value is None
    empty, _ = runner.run(1)
    assert OpRecord.loads(empty).name == ""  # an empty name stays empty, not the default
    fine, _ = runner.run(2)
    assert OpRecord.loads(fine).name == "fine"


def test_a_failing_item_and_a_root_batch_are_recorded_as_before():
    def item(ctx, x, index, inputs):
        if index == 3:
            raise ValueError("three")
        return {"x": x}

    runner = _runner(func=item, batch_op_id="")
    failed, value = runner.run(3)
    assert isinstance(failed, OpRecord) and failed.status == "FAILED" and failed.name == map_item_name(3)
    assert failed.op_id == operation_id("", 3) and value is None
    data, value = runner.run(4)
    rec = OpRecord.loads(data)
    assert rec.op_id == operation_id("", 4) and value is NOT_SENT


@pytest.mark.parametrize("indices", [
    [], [0], [5], list(range(1000)), list(range(998, 1003)), list(range(12_345, 14_567)),
    list(range(10**12 - 2, 10**12 + 3)), list(range(10**13, 10**13 + 1500)),
    [3, 1, 2], [0, 2, 4], [7, 7], [1000, 999], [-1, 0, 1],
])
def test_a_run_of_branch_keys_is_each_branch_key(indices):
    assert branch_key_list(indices) == [branch_key(i) for i in indices]
