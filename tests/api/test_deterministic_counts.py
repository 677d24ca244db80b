"""The same handler with the same failures gives the same BatchResult on every run (issue 9).

Under ``skip_time`` (the testing runner's default) retry delays take no time, so a
retrying item used to race the items that decide a ``min_successful`` batch: the counts
changed from run to run.  The reference's runner puts retries on a virtual clock, so the
items that need no delay always win.  durable_mp does the same: under ``skip_time`` an
outcome reached after skipped delays counts only once nothing else is running or still
to start, and what the decision did not count stays STARTED.
"""

from __future__ import annotations

import json

import pytest

from durable_mp import durable_execution
from durable_mp.config import CompletionConfig, Duration, MapConfig, ParallelConfig, StepConfig
from durable_mp.retries import RetryStrategyConfig, create_retry_strategy
from durable_mp.testing import DurableFunctionTestRunner

RUNS = 10
FAILING = (7, 8, 9)  # items (values) that fail every attempt, as in the reference's map_with_min_successful


def process(item: int) -> int:
    if item in FAILING:
        raise ValueError(f"Item {item} failed")
    return item * 2


def summary(result) -> list:
    """Counts and reason; which of several equally fast items won is a race, as in the reference."""
    return [result.success_count, result.failure_count, result.started_count, result.total_count,
            result.completion_reason.value, sorted(item.status.value for item in result.all)]


@durable_execution
def map_min_successful(event, ctx):
    retry = create_retry_strategy(RetryStrategyConfig(max_attempts=3, initial_delay=Duration.from_seconds(1)))
    result = ctx.map(list(range(1, 11)),
                     lambda c, item, i, _: c.step(lambda _: process(item), name=f"item_{i}",
                                                  config=StepConfig(retry_strategy=retry)),
                     config=MapConfig(max_concurrency=5, completion_config=CompletionConfig(min_successful=6)))
    return summary(result)


@durable_execution
def parallel_first_successful(event, ctx):
    retry = create_retry_strategy(RetryStrategyConfig(max_attempts=2, initial_delay=Duration.from_seconds(1)))
    branches = [lambda c, item=item: c.step(lambda _: process(item), name=f"b{item}",
                                            config=StepConfig(retry_strategy=retry)) for item in (7, 8, 2, 3)]
    result = ctx.parallel(branches, config=ParallelConfig(completion_config=CompletionConfig.first_successful()))
    return summary(result)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("handler", "expected"), [
    # retrying items never fail before the sixth success: their delays put them later (virtual time)
    (map_min_successful, [6, 0, 4, 10, "MIN_SUCCESSFUL_REACHED", ["STARTED"] * 4 + ["SUCCEEDED"] * 6]),
    (parallel_first_successful, [1, 0, 3, 4, "MIN_SUCCESSFUL_REACHED", ["STARTED"] * 3 + ["SUCCEEDED"]]),
], ids=["map-min-successful", "parallel-first-successful"])
def test_counts_are_the_same_on_every_run(handler, expected):
    seen = []
    with DurableFunctionTestRunner(handler=handler) as runner:
        for _ in range(RUNS):
            seen.append(json.loads(runner.run(execution_timeout=60).result))
    assert seen == [expected] * RUNS


@pytest.mark.process_free
def test_virtual_time_policy_holds_delayed_outcomes_until_nothing_else_can_end():
    from durable_mp.concurrency.models import CompletionPolicy, CompletionReason

    policy = CompletionPolicy(CompletionConfig(min_successful=2), 4, virtual_time=True)
    for index in range(4):
        policy.on_started(index)
    policy.on_finished(0, False, skipped=3.0)  # failed after 3 s of skipped retry delays: held
    policy.on_finished(1, True)
    assert (policy.failed_count, policy.succeeded_count, policy.decision()) == (0, 1, None)
    policy.on_finished(2, True)
    assert policy.decision() is CompletionReason.MIN_SUCCESSFUL_REACHED
    policy.on_finished(3, True)  # reported after the decision: not counted
    assert (policy.succeeded_count, policy.failed_count, policy.uncounted()) == (2, 0, [0, 3])
    # once every item has ended, held outcomes count in order of their skipped time
    late = CompletionPolicy(CompletionConfig(tolerated_failure_count=0), 2, virtual_time=True)
    late.on_finished(0, False, skipped=1.0)
    assert late.decision() is None
    late.on_finished(1, True)
    assert late.decision() is CompletionReason.FAILURE_TOLERANCE_EXCEEDED and late.uncounted() == []
