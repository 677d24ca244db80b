"""A batch ends by its completion rule, on real processes (docs/architecture.md, "Completion").

Failures stop the starting of branches but let the running ones finish; a completion reached
by successes (``first_successful``) terminates the rest and records them STARTED.  Ordering,
counts and marker files only, no wall-clock budgets.  The rule's truth table, without
processes, is ``tests/api/test_completion_policy.py``.
"""

from __future__ import annotations

import os
import time

import pytest

from durable_mp import BatchItemStatus, CompletionReason, durable_execution
from durable_mp.config import CompletionConfig, ParallelConfig
from util import run_skip_time

pytestmark = pytest.mark.timeout(120)


def test_first_successful_terminates_the_rest_and_records_them_started(store_path, tmp_path):
    @durable_execution
    def handler(event, ctx):
        def fast(c):
            return "fast"

        def slow(c):
            time.sleep(30)
            open(tmp_path / f"slow-ended-{os.getpid()}", "w").close()
            return "slow"

        cfg = ParallelConfig(max_concurrency=3, completion_config=CompletionConfig.first_successful())
        return ctx.parallel([slow, fast, slow], config=cfg)

    r = run_skip_time(handler, store_path)
    # the slow branches' workers are gone when run() returns: had it waited for them, they would have ended
    assert not [n for n in os.listdir(tmp_path) if n.startswith("slow-ended-")], \
        "early completion must not wait for the slow branches"
    assert r.completion_reason == CompletionReason.MIN_SUCCESSFUL_REACHED
    assert r.status == BatchItemStatus.SUCCEEDED
    statuses = {it.index: it.status for it in r.all}
    assert statuses[1] == BatchItemStatus.SUCCEEDED
    assert statuses.get(0) == BatchItemStatus.STARTED and statuses.get(2) == BatchItemStatus.STARTED
    assert r.get_results() == ["fast"]


# -- failures: no more branches start, the running ones finish ---------------------------------
@pytest.mark.parametrize("run", range(3))
def test_fail_fast_with_max_concurrency_1_never_starts_the_branch_after_the_failure(store_path, tmp_path, run):
    started = tmp_path / "started"
    started.mkdir()

    def make(i):
        def branch(ctx):
            (started / str(i)).write_text("")
            if i == 1:
                raise ValueError("branch 1 fails")
            return i
        return branch

    @durable_execution
    def handler(event, ctx):
        r = ctx.parallel([make(i) for i in range(3)],
                         config=ParallelConfig(max_concurrency=1, completion_config=CompletionConfig()))
        return r.total_count, r.completion_reason, [it.status for it in r.all]

    total, reason, statuses = handler.run(None, store=store_path)
    assert sorted(os.listdir(started)) == ["0", "1"], "branch 2 must never start"
    assert total == 2
    assert statuses == [BatchItemStatus.SUCCEEDED, BatchItemStatus.FAILED]
    assert reason is CompletionReason.FAILURE_TOLERANCE_EXCEEDED


@pytest.mark.parametrize("fail_at", [3, 700])  # in the first chunk; in a later chunk, queued ahead
def test_fail_fast_map_stops_starting_items_inside_a_chunk(store_path, tmp_path, fail_at):
    started = tmp_path / "started"
    started.mkdir()

    def item(ctx, x, i, xs):
        (started / str(i)).write_text("")
        if i == fail_at:
            raise ValueError(f"item {i} fails")
        return x

    @durable_execution(max_workers=1)
    def handler(event, ctx):
        r = ctx.map(list(range(2000)), item)
        return r.total_count, r.completion_reason

    total, reason = handler.run(None, store=store_path)
    ran = sorted(int(n) for n in os.listdir(started))
    assert ran == list(range(fail_at + 1)), f"items started after the failure: {ran[fail_at + 1:][:10]}"
    assert total == fail_at + 1
    assert reason is CompletionReason.FAILURE_TOLERANCE_EXCEEDED


def test_a_failing_branch_lets_its_running_siblings_finish(store_path):
    def slow(seconds, value):
        def run(ctx):
            time.sleep(seconds)
            return value
        return run

    def boom(ctx):
        raise RuntimeError("orders service down")

    @durable_execution
    def handler(event, ctx):
        r = ctx.parallel([slow(1, {"user": 1}), slow(1.5, {"orders": 2}), boom])
        return (r.success_count, r.failure_count, r.status.value, r.completion_reason.value, r.get_results())

    assert handler.run(None, store=store_path) == (2, 1, "FAILED", "ALL_COMPLETED", [{"user": 1}, {"orders": 2}])
