"""``skip_time`` makes sleeps instant and changes nothing else (issue 18, defect 6).

The testing runner (``skip_time=True``) must check what production runs: the start
budget of ``max_concurrency``, the completion policy and what a ``BatchResult`` reports
are the real clock's.  A branch sleeping in a ``wait`` or a retry delay keeps its slot;
an item the policy never started is left out of ``all`` and the counts, as in the
reference.  Each case runs as a top-level batch (branches in worker processes, the
dispatcher decides) and as a batch nested in a branch (branches on threads of a worker).
"""

from __future__ import annotations

import json

import pytest

from durable_mp import durable_execution
from durable_mp.config import CompletionConfig, Duration, MapConfig, ParallelConfig, StepConfig
from durable_mp.retries import RetryDecision
from durable_mp.testing import DurableFunctionTestRunner

pytestmark = pytest.mark.timeout(120)


def summary(result) -> list:
    return [result.success_count, result.failure_count, result.started_count, result.total_count,
            result.completion_reason.value, [[item.index, item.status.value] for item in result.all]]


def good(ctx):
    return ctx.step(lambda _: "good", name="good")


def wait_then_raise(ctx):
    ctx.wait(Duration.from_seconds(5))
    raise ValueError("after the wait")


def wait_then_succeed(ctx):
    ctx.wait(Duration.from_seconds(5))
    return "waited"


def retry_once(error, attempts):
    return RetryDecision(should_retry=attempts < 2, delay=Duration.from_seconds(3))


def flaky_once(step_ctx):
    if step_ctx.attempt == 1:
        raise ValueError("first attempt")
    return step_ctx.attempt


def retrying(ctx):
    return ctx.step(flaky_once, name="flaky", config=StepConfig(retry_strategy=retry_once))


def min_two_of_four(ctx):
    config = ParallelConfig(max_concurrency=1, completion_config=CompletionConfig(min_successful=2))
    return summary(ctx.parallel([good, good, good, good], config=config))


def first_successful_of_three(ctx):
    config = MapConfig(max_concurrency=1, completion_config=CompletionConfig.first_successful())
    return summary(ctx.map([0, 1, 2], lambda c, item, i, items: good(c), config=config))


def waiting_branch_keeps_its_slot(ctx):
    return summary(ctx.parallel([wait_then_raise, good, good], config=ParallelConfig(max_concurrency=1)))


def waiting_branch_wins_first_successful(ctx):
    config = ParallelConfig(max_concurrency=1, completion_config=CompletionConfig.first_successful())
    return summary(ctx.parallel([wait_then_succeed, good, good], config=config))


def retrying_branch_keeps_its_slot(ctx):
    config = MapConfig(max_concurrency=1, completion_config=CompletionConfig(min_successful=2,
                                                                            tolerated_failure_percentage=50))
    return summary(ctx.map([0, 1, 2, 3, 4], lambda c, item, i, items: retrying(c), config=config))


def fails_on(failing):
    def process(ctx, item, index, items):
        def body(step_ctx):
            if item in failing:
                raise ValueError(f"item {item} failed")
            return item
        return ctx.step(body, name=f"item-{index}", config=StepConfig(retry_strategy=retry_once))
    return process


def retrying_items_keep_their_slots(ctx):
    """The reference examples' map_completion: items 1 and 3 fail, each retrying in its slot."""
    config = MapConfig(max_concurrency=3, completion_config=CompletionConfig(min_successful=2,
                                                                            tolerated_failure_percentage=50))
    return summary(ctx.map([0, 1, 2, 3, 4], fails_on({1, 3}), config=config))


def sleeper_loses_the_race(ctx):
    config = ParallelConfig(completion_config=CompletionConfig.first_successful())
    return summary(ctx.parallel([wait_then_succeed, good], config=config))


CASES = {
    # the reference: total 2, the two branches that ran
    "min-successful": (min_two_of_four, [2, 0, 0, 2, "MIN_SUCCESSFUL_REACHED", [[0, "SUCCEEDED"], [1, "SUCCEEDED"]]]),
    # items 1 and 2 never started
    "first-successful": (first_successful_of_three, [1, 0, 0, 1, "MIN_SUCCESSFUL_REACHED", [[0, "SUCCEEDED"]]]),
    # branch 0 keeps the only slot through its wait, then fails: nothing else starts
    "wait-keeps-slot": (waiting_branch_keeps_its_slot, [0, 1, 0, 1, "FAILURE_TOLERANCE_EXCEEDED", [[0, "FAILED"]]]),
    "wait-wins-first-successful": (waiting_branch_wins_first_successful,
                                   [1, 0, 0, 1, "MIN_SUCCESSFUL_REACHED", [[0, "SUCCEEDED"]]]),
    # each item retries once (a skipped 3 s delay) in the only slot: items 2..4 never start
    "retry-keeps-slot": (retrying_branch_keeps_its_slot,
                         [2, 0, 0, 2, "MIN_SUCCESSFUL_REACHED", [[0, "SUCCEEDED"], [1, "SUCCEEDED"]]]),
    # items 0..2 start; 0 succeeds and frees a slot for 3; 2 succeeds while 1 and 3 wait out their
    # retry delays: the reference's 4 items, 0 failures (the real clock's schedule, every run)
    "retries-keep-slots": (retrying_items_keep_their_slots,
                           [2, 0, 2, 4, "MIN_SUCCESSFUL_REACHED",
                            [[0, "SUCCEEDED"], [1, "STARTED"], [2, "SUCCEEDED"], [3, "STARTED"]]]),
    # both start; branch 0 is still in its wait when branch 1 succeeds
    "sleeper-loses": (sleeper_loses_the_race,
                      [1, 0, 1, 2, "MIN_SUCCESSFUL_REACHED", [[0, "STARTED"], [1, "SUCCEEDED"]]]),
}


@durable_execution
def top_level(event, ctx):
    return CASES[event["case"]][0](ctx)


@durable_execution
def nested(event, ctx):
    outer = ctx.parallel([lambda c: CASES[event["case"]][0](c)])
    return outer.get_results()[0]


@pytest.mark.parametrize("where", ["top-level", "nested"])
@pytest.mark.parametrize("case", list(CASES))
def test_skip_time_runs_the_real_clocks_schedule(case, where):
    handler = top_level if where == "top-level" else nested
    with DurableFunctionTestRunner(handler=handler, skip_time=True) as runner:
        result = runner.run(input=json.dumps({"case": case}), execution_timeout=60)
    assert json.loads(result.result) == CASES[case][1]


def test_the_virtual_clock_skips_only_when_every_branch_sleeps(monkeypatch):
    from durable_mp.engine import virtual_clock

    real = [100.0]
    monkeypatch.setattr(virtual_clock.time, "monotonic", lambda: real[0])
    clock = virtual_clock.VirtualClock()
    clock.hold(0, 5.0, "slept 5 s")
    clock.hold(2, 0.0, "no sleep")
    assert len(clock) == 2 and clock.may_release(running=True)
    assert clock.release() == (2, "no sleep") and clock.skipped == 0.0
    # branch 0's end is 5 s ahead: while another branch runs, real time must pass first
    assert not clock.may_release(running=True) and clock.seconds_to_next() == 5.0
    real[0] += 2.0
    assert not clock.may_release(running=True) and clock.seconds_to_next() == 3.0
    # nothing runs: the clock skips the 3 s left
    assert clock.may_release(running=False)
    assert clock.release() == (0, "slept 5 s") and clock.skipped == 3.0 and clock.now() == 105.0
    clock.hold(1, 1.0, "x")
    clock.hold(3, 1.0, "y")
    assert clock.still_sleeping() == [1, 3] and len(clock) == 0 and clock.seconds_to_next() is None
