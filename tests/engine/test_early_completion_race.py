"""A batch completed by its first success leaves no record of the branches it never started.

Suspected race (seen once under heavy load): ``parallel`` of 3 branches with
``max_concurrency=1`` and ``first_successful()`` recorded the third branch STARTED.
Expected, as in the reference: branch 0 succeeds, branches 1 and 2 never start, so they
have no record and ``total_count`` is 1.  The shape is run many times, top level (the
process pool) and nested in a branch (the thread runner), for a parallel, a map of 3 and
a map of 64 items, while a CPU burner process competes for the cores.  One more shape
makes the dispatcher queue a branch ahead behind a busy worker (CPU-bound branches: after
branch 0 fails, branch 2 is queued behind branch 1, whose success must keep it unstarted).

Found: the map of 64 recorded item 1 STARTED in about 4 runs of 10.  Its worker's start
budget had stopped the chunk after item 0, but the driver killed the worker before reading
the chunk's end, and named the first unreported item as if a death were to blame on it
(``engine.faults.may_have_started`` now names only items the worker's slot says began).
Under ``skip_time`` every shape still records the never-started items STARTED: that is the
virtual clock's counting (issue 18 defect 6), not this race, and is left to its own fix.
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


def failing(ctx):
    spin(0.05)  # CPU-bound: once it ended, the dispatcher may queue the next branch behind a busy worker
    raise ValueError("branch 0 fails")


def second(ctx):
    spin(0.05)
    return "second"


def item(ctx, x, i, xs):
    if i == 0:
        spin(0.02)
    return x * 10


def parallel_of_3(ctx):
    branches = [ParallelBranch(first, name="b0"), ParallelBranch(later, name="b1"), ParallelBranch(later, name="b2")]
    return ctx.parallel(branches, name="par", config=ParallelConfig(max_concurrency=1, completion_config=FIRST))


def parallel_after_a_failure(ctx):
    """Branch 0 fails, branch 1 succeeds: branch 2, maybe queued ahead behind branch 1, must not start."""
    branches = [ParallelBranch(failing, name="b0"), ParallelBranch(second, name="b1"), ParallelBranch(later, name="b2")]
    return ctx.parallel(branches, name="par", config=ParallelConfig(max_concurrency=1, completion_config=FIRST))


def map_of(n: int):
    def run(ctx):
        return ctx.map(list(range(n)), item, name="map", config=MapConfig(max_concurrency=1, completion_config=FIRST))
    return run


SHAPES = {"parallel3": parallel_of_3, "map3": map_of(3), "map64": map_of(64),
          "parallel3-after-failure": parallel_after_a_failure}
# (total_count, success_count, results, item records by name) that every run must give
EXPECTED = {"parallel3": (1, 1, ["first"], [("b0", "SUCCEEDED")]),
            "map3": (1, 1, [0], [("map-item-0", "SUCCEEDED")]),
            "map64": (1, 1, [0], [("map-item-0", "SUCCEEDED")]),
            "parallel3-after-failure": (2, 1, ["second"], [("b0", "FAILED"), ("b1", "SUCCEEDED")])}


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
    for run in range(RUNS):
        exec_id = f"race-{shape}-{run}"
        total, succeeded, results = handler.run(None, execution_id=exec_id, store=store, max_workers=2)
        with Store(store, readonly=True) as st:
            records = st.ops(exec_id)
            problems = audit(st, exec_id)
        items = sorted((r.name, r.status) for r in records if r.sub_type in BRANCH_SUB_TYPES and r.name != "outer")
        assert not problems, f"run {run}: {problems}"
        want_total, want_succeeded, want_results, want_items = EXPECTED[shape]
        assert items == want_items, f"run {run}: never-started branches recorded: {items}"
        assert (total, succeeded) == (want_total, want_succeeded), f"run {run}: total {total}, succeeded {succeeded}"
        assert results == want_results, f"run {run}: {results}"


def _slow(ctx):
    import time
    time.sleep(30)  # killed when the batch completes: never ends on its own in the test's time
    return "slow"


@durable_execution
def _first_of_three_on_one_worker(event, ctx):
    cap = event["cap"]
    result = ctx.parallel([lambda c: "fast", _slow, _slow],
                          config=ParallelConfig(max_concurrency=cap, completion_config=FIRST))
    return [result.total_count, [item.status.value for item in result.all]]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("cap", "expected"), [
    (None, [3, ["SUCCEEDED", "STARTED", "STARTED"]]),   # the reference starts every branch at once
    (2, [2, ["SUCCEEDED", "STARTED"]]),                   # ... or as many as max_concurrency allows
    (1, [1, ["SUCCEEDED"]]),                              # ... and none after the decision
])
def test_a_completion_by_success_counts_what_the_reference_had_started(cap, expected, tmp_path):
    """Started means started by the batch (in index order, up to ``max_concurrency``), not begun by
    one of our processes: with one worker, branches 1 and 2 wait for it, yet the reference (a thread
    per branch) had them running when branch 0 won, and reports them STARTED."""
    store = str(tmp_path / "store")
    assert _first_of_three_on_one_worker.run({"cap": cap}, store=store, max_workers=1) == expected
    with Store(store) as s:
        (exec_id,) = [e.exec_id for e in s.list_executions()]
        assert audit(s, exec_id) == []
