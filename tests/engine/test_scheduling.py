"""Scheduling: the pool overlaps I/O-bound branches, never oversubscribes CPU-bound ones,
and an explicit max_concurrency is honoured as given.  Asserted on recorded start/end
times of the branches (overlap), never on wall-clock budgets."""

from __future__ import annotations

import os
import time

import pytest

from durable_mp import durable_execution
from durable_mp.config import MapConfig, ParallelConfig

pytestmark = pytest.mark.timeout(120)
NCPU = os.cpu_count() or 1


def max_overlap(intervals):
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    cur = best = 0
    for _, delta in events:
        cur += delta
        best = max(best, cur)
    return best


def sleeper(seconds):
    def run(ctx):
        start = time.time()
        time.sleep(seconds)
        return start, time.time(), os.getpid()
    return run


def burner(seconds):
    def run(ctx):
        start = time.time()
        x = 0
        while time.time() - start < seconds:
            x += 1
        return start, time.time(), os.getpid()
    return run


def test_io_bound_branches_beyond_the_core_count_run_together(store_path):
    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([sleeper(1.5) for _ in range(NCPU + 1)]).get_results()

    spans = handler.run(None, store=store_path)
    assert max_overlap([(s, e) for s, e, _ in spans]) == NCPU + 1, "the sleeping branches must not queue"


def test_cpu_bound_branches_are_not_oversubscribed(store_path):
    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([burner(0.4) for _ in range(3 * NCPU)]).get_results()

    spans = handler.run(None, store=store_path)
    assert max_overlap([(s, e) for s, e, _ in spans]) <= NCPU
    assert len({pid for *_, pid in spans}) <= NCPU, "workers are reused across branches"


@pytest.mark.parametrize("limit", [1, 5])
def test_explicit_max_concurrency_is_honoured(store_path, limit):
    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([sleeper(0.4) for _ in range(5)],
                            config=ParallelConfig(max_concurrency=limit)).get_results()

    spans = handler.run(None, store=store_path)
    assert max_overlap([(s, e) for s, e, _ in spans]) == limit


def test_map_over_many_items_sends_chunks_but_checkpoints_every_item(store_path):
    from durable_mp.store.facade import Store

    @durable_execution
    def handler(event, ctx):
        return ctx.map(list(range(5000)), lambda c, x, i, xs: (x, os.getpid()),
                       config=MapConfig(max_concurrency=2)).get_results()

    out = handler.run(None, store=store_path)
    assert [x for x, _ in out] == list(range(5000))
    with Store(store_path) as st:
        iters = [r for r in st.ops(handler.execution_id_for(None)) if r.sub_type == "MapIteration"]
    assert len(iters) == 5000 and {r.status for r in iters} == {"SUCCEEDED"}


def test_branches_sharing_a_large_object_ship_it_once(store_path):
    from durable_mp.concurrency.models import CompletionPolicy
    from durable_mp.engine.payload import build_payload
    from durable_mp.core.spec import BatchSpec

    shared = bytes(8 * 2**20)  # 8 MiB every branch closes over
    funcs = [lambda c, k=k: len(shared) + k for k in range(20)]
    spec = BatchSpec(op_id="p", sub_type="Parallel", item_sub_type="ParallelBranch", name=None, n=20, names=None,
                     funcs=funcs, func=None, inputs=None, item_serdes=None, max_concurrency=None,
                     branch_timeout=None, policy=CompletionPolicy(None, 20))
    payload = build_payload(spec, lambda index, error: None)
    assert len(payload) < 2 * len(shared), "the shared object must travel once, not 20 times"

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel(funcs).get_results()

    assert handler.run(None, store=store_path) == [len(shared) + k for k in range(20)]


def test_retry_sleeps_do_not_grow_the_pool_past_the_cores_for_cpu_bound_steps(store_path):
    """Issue 19 §9: a worker sleeping out a retry delay looks idle on the CPU, but it is no
    I/O wait: its step comes back CPU-bound.  Counting it as one grew the pool to 6 workers
    on 2 cores and ran 5 CPU-bound attempts at once."""
    from durable_mp.config import Duration, JitterStrategy, StepConfig
    from durable_mp.retries import RetryStrategyConfig, create_retry_strategy

    retry = StepConfig(retry_strategy=create_retry_strategy(RetryStrategyConfig(
        max_attempts=2, initial_delay=Duration.from_seconds(1), jitter_strategy=JitterStrategy.NONE)))

    def burn_after_one_failure(step_ctx):
        if step_ctx.attempt == 1:
            raise ValueError("fails once, then computes")
        start, cpu = time.monotonic(), time.process_time()
        while time.process_time() - cpu < 0.3:
            pass
        return start, time.monotonic(), os.getpid()

    @durable_execution
    def handler(event, ctx):
        return ctx.map(list(range(3 * NCPU)), lambda c, x, i, xs: c.step(burn_after_one_failure, config=retry)
                       ).get_results()

    spans = handler.run(None, store=store_path)
    assert len(spans) == 3 * NCPU
    assert max_overlap([(s, e) for s, e, _ in spans]) <= NCPU, "more CPU-bound attempts ran at once than cores"
