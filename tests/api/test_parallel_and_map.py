"""``context.parallel`` and ``context.map`` end to end: results in input order, failed items,
nesting, and values that cross the process boundary.  Real worker processes, a real LMDB store."""

from __future__ import annotations

import os
import time

import pytest

from durable_mp import (
    BatchItemStatus,
    BatchResult,
    CompletionReason,
    DurableContext,
    durable_execution,
)
from durable_mp.config import CompletionConfig, MapConfig, ParallelConfig, StepConfig
from durable_mp.retries import RetryStrategyConfig, create_retry_strategy
from util import run_skip_time

pytestmark = pytest.mark.timeout(60)


def test_parallel_results_in_input_order_with_successful_results(store_path):
    @durable_execution
    def handler(event, ctx: DurableContext):
        def make(i):
            def branch(c: DurableContext):
                time.sleep(0.05 * (3 - i))  # later branches finish first
                return c.step(lambda _: {"branch": i, "pid": os.getpid()}, name=f"work-{i}")
            return branch
        r = ctx.parallel([make(i) for i in range(3)], name="fanout")
        return r

    r: BatchResult = run_skip_time(handler, store_path)
    assert [it.index for it in r.all] == [0, 1, 2]
    assert [x["branch"] for x in r.successful_results] == [0, 1, 2]
    assert [x["branch"] for x in r.get_results()] == [0, 1, 2]
    assert r.all[1].result["branch"] == 1
    assert r.status == BatchItemStatus.SUCCEEDED
    assert r.completion_reason == CompletionReason.ALL_COMPLETED
    assert (r.success_count, r.failure_count, r.started_count, r.total_count) == (3, 0, 0, 3)
    assert r.failed_results == []
    assert all(x["pid"] != os.getpid() for x in r.successful_results), "branches must run in worker processes"


def test_failed_branch_is_an_item_with_type_message_and_traceback(store_path):
    @durable_execution
    def handler(event, ctx):
        def ok(c):
            return "fine"

        def bad(c):
            raise ValueError("branch 1 exploded")

        return ctx.parallel([ok, bad, ok], config=ParallelConfig(completion_config=CompletionConfig.all_completed()))

    r = run_skip_time(handler, store_path)
    assert r.status == BatchItemStatus.FAILED
    assert r.completion_reason == CompletionReason.ALL_COMPLETED
    assert [it.status for it in r.all] == [BatchItemStatus.SUCCEEDED, BatchItemStatus.FAILED, BatchItemStatus.SUCCEEDED]
    err = r.all[1].error
    assert err.type == "ValueError" and err.message == "branch 1 exploded"
    assert any("branch 1 exploded" in line for line in err.stack_trace)
    assert any("def bad" in line or "raise ValueError" in line for line in err.stack_trace)
    assert r.get_errors() == [err]
    assert r.failed_results[0].index == 1
    assert r.get_results() == ["fine", "fine"]


def test_failed_step_in_branch_surfaces_as_step_error(store_path):
    @durable_execution
    def handler(event, ctx):
        def branch(c):
            return c.step(lambda _: {}["missing"], name="lookup", config=StepConfig(
                retry_strategy=create_retry_strategy(RetryStrategyConfig(max_attempts=1))))
        return ctx.parallel([branch])

    r = run_skip_time(handler, store_path)
    item = r.all[0]
    assert item.status == BatchItemStatus.FAILED
    assert item.error.type == "durable_mp.exceptions.StepError"
    assert "missing" in item.error.message
    with pytest.raises(Exception) as info:
        r.throw_if_error()
    assert type(info.value).__name__ == "ChildContextError"


def test_map_with_item_namer_passes_item_index_and_inputs(store_path):
    @durable_execution
    def handler(event, ctx):
        cfg = MapConfig(item_namer=lambda item, i: f"sq-{item}")
        return ctx.map([3, 4, 5], lambda c, item, i, inputs: (item * item, i, len(inputs)), name="squares", config=cfg)

    r = run_skip_time(handler, store_path)
    assert r.get_results() == [(9, 0, 3), (16, 1, 3), (25, 2, 3)]
    from durable_mp.store.facade import Store
    with Store(store_path) as st:
        names = sorted(rec.name for rec in st.ops(handler.execution_id_for(None)) if rec.sub_type == "MapIteration")
    assert names == ["sq-3", "sq-4", "sq-5"]


def test_map_default_is_fail_fast(store_path):
    @durable_execution
    def handler(event, ctx):
        def item(c, x, i, inputs):
            if x == 1:
                raise RuntimeError("no")
            return x
        return ctx.map([0, 1, 2, 3], item, config=MapConfig(max_concurrency=1))

    r = run_skip_time(handler, store_path)
    assert r.completion_reason == CompletionReason.FAILURE_TOLERANCE_EXCEEDED
    assert [(it.index, it.status) for it in r.all] == [(0, BatchItemStatus.SUCCEEDED), (1, BatchItemStatus.FAILED)]


def test_empty_map_succeeds_with_no_items(store_path):
    @durable_execution
    def handler(event, ctx):
        r = ctx.map([], lambda c, x, i, xs: x)
        return (r.status, r.completion_reason, r.total_count)

    assert run_skip_time(handler, store_path) == (BatchItemStatus.SUCCEEDED, CompletionReason.ALL_COMPLETED, 0)


def test_nested_parallel_and_map_inside_a_branch(store_path):
    @durable_execution
    def handler(event, ctx):
        def outer(c: DurableContext):
            inner = c.map(["x", "y"], lambda cc, s, i, xs: cc.step(lambda _: s.upper(), name=f"up-{s}"))
            return inner.get_results()

        def plain(c):
            return "plain"

        return ctx.parallel([outer, plain]).get_results()

    assert run_skip_time(handler, store_path) == [["X", "Y"], "plain"]


def test_closures_and_lambdas_cross_the_process_boundary(store_path):
    @durable_execution
    def handler(event, ctx):
        base = {"offset": 100}
        fns = [lambda c, k=k: base["offset"] + k for k in range(4)]
        return ctx.parallel(fns).get_results()

    assert run_skip_time(handler, store_path) == [100, 101, 102, 103]


def test_results_round_trip_numpy_dataclasses_and_batch_results(store_path):
    import dataclasses

    import numpy as np

    @dataclasses.dataclass
    class Point:
        x: int
        y: float

    @durable_execution
    def handler(event, ctx):
        inner = ctx.parallel([lambda c: np.arange(6, dtype=np.float32).reshape(2, 3), lambda c: Point(1, 2.5)])
        nested = ctx.run_in_child_context(lambda c: c.map([1, 2], lambda cc, x, i, xs: x * 2), name="child")
        return inner, nested

    inner, nested = run_skip_time(handler, store_path)
    arr, point = inner.get_results()
    assert arr.dtype == np.float32 and arr.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert point.x == 1 and point.y == 2.5
    assert nested.get_results() == [2, 4] and type(nested).__name__ == "BatchResult"


def test_json_item_serdes_is_honoured(store_path):
    from durable_mp.serdes import JsonSerDes
    from durable_mp.store.facade import Store

    @durable_execution
    def handler(event, ctx):
        return ctx.map([1, 2], lambda c, x, i, xs: {"v": x}, config=MapConfig(item_serdes=JsonSerDes())).get_results()

    assert run_skip_time(handler, store_path) == [{"v": 1}, {"v": 2}]
    with Store(store_path) as st:
        payloads = [r.result for r in st.ops(handler.execution_id_for(None)) if r.sub_type == "MapIteration"]
    assert sorted(payloads) == ['{"v": 1}', '{"v": 2}']
