"""A batch completed by its first success leaves no record of the branches it never started.

Suspected race (seen once under heavy load): ``parallel`` of 3 branches with
``max_concurrency=1`` and ``first_successful()`` recorded the third branch STARTED.
Expected, as in the reference: branch 0 succeeds, branches 1 and 2 never start, so they
have no record and ``total_count`` is 1.  The shape is run many times, top level (the
process pool) and nested in a branch (the thread runner), for a parallel, a map of 3 and
a map of 64 items, while a CPU burner process competes for the cores.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from durable_mp import ParallelBranch, durable_execution
from durable_mp.config import CompletionConfig, MapConfig, ParallelConfig
from durable_mp.store import Store
from durable_mp.store.audit import audit

RUNS = int(os.environ.get("DURABLE_MP_RACE_RUNS", "30"))
FIRST = CompletionConfig.first_successful()
BRANCH_SUB_TYPES = ("ParallelBranch", "MapIteration")


def spin(seconds: float) -> None:
    """Keep a core busy: the branch counts as CPU-bound, the case that may be queued ahead."""
    import time
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def first(ctx):
    spin(0.02)
    return "first"


def later(ctx):
    return "later"


def item(ctx, x, i, xs):
    if i == 0:
        spin(0.02)
    return x * 10


def parallel_of_3(ctx):
    branches = [ParallelBranch(first, name="b0"), ParallelBranch(later, name="b1"), ParallelBranch(later, name="b2")]
    return ctx.parallel(branches, name="par", config=ParallelConfig(max_concurrency=1, completion_config=FIRST))


def map_of(n: int):
    def run(ctx):
        return ctx.map(list(range(n)), item, name="map", config=MapConfig(max_concurrency=1, completion_config=FIRST))
    return run


SHAPES = {"parallel3": parallel_of_3, "map3": map_of(3), "map64": map_of(64)}


def top_handler(shape: str):
    batch = SHAPES[shape]

    @durable_execution
    def handler(event, ctx):
        result = batch(ctx)
        return result.total_count, result.success_count, result.get_results()
    return handler


def nested_handler(shape: str):
    batch = SHAPES[shape]

    def outer(ctx):
        result = batch(ctx)
        return result.total_count, result.success_count, result.get_results()

    @durable_execution
    def handler(event, ctx):
        got = ctx.parallel([ParallelBranch(outer, name="outer")])
        got.throw_if_error()
        return got.get_results()[0]
    return handler


@pytest.fixture
def cpu_burner():
    """A process that keeps one core busy for the test's duration."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("nested", [False, True], ids=["pool", "threads"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_never_started_branches_leave_no_record(shape, nested, tmp_path, cpu_burner):
    handler = nested_handler(shape) if nested else top_handler(shape)
    store = str(tmp_path / "store")
    seen = []
    for run in range(RUNS):
        exec_id = f"race-{shape}-{run}"
        total, succeeded, results = handler.run(None, execution_id=exec_id, store=store, max_workers=2)
        with Store(store, readonly=True) as st:
            records = st.ops(exec_id)
            problems = audit(st, exec_id)
        items = sorted((r.name, r.status) for r in records if r.sub_type in BRANCH_SUB_TYPES and r.name != "outer")
        seen.append((run, total, items))
        assert not problems, f"run {run}: {problems}"
        assert (total, succeeded) == (1, 1), f"run {run}: total {total}, succeeded {succeeded}, records {items}"
        assert results == (["first"] if shape == "parallel3" else [0]), f"run {run}: {results}"
        assert len(items) == 1 and items[0][1] == "SUCCEEDED", f"run {run}: never-started branches recorded: {items}"
