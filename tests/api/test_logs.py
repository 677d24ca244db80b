"""What a run logs by default: each distinct failure once with the user's frame, every retry,
and the log records of user code in the workers, with the branch they came from.

Real worker processes and a real store; log records of workers are re-emitted by the driver,
so ``caplog`` sees them.
"""

from __future__ import annotations

import logging
import os
import re

import pytest

from durable_mp import durable_execution
from durable_mp.config import CompletionConfig, Duration, MapConfig, StepConfig
from durable_mp.retries import JitterStrategy, RetryStrategyConfig, create_retry_strategy
from util import run_skip_time

pytestmark = pytest.mark.timeout(60)


# -- failures of map items --------------------------------------------------------------------
TOLERANT = MapConfig(completion_config=CompletionConfig.all_completed())


def explode(ctx, x, index, items):
    if x % 2:
        raise ValueError(f"odd item {x}")
    raise KeyError("even")


def test_each_distinct_failure_is_logged_once_with_the_users_frame(store_path, caplog):
    @durable_execution
    def handler(event, ctx):
        return ctx.map(list(range(10)), explode, name="explode", config=TOLERANT).failure_count

    with caplog.at_level(logging.WARNING):
        assert handler.run(None, store=store_path, max_workers=2) == 10
    failures = [r.getMessage() for r in caplog.records if r.name == "durable_mp.failures"]
    value_errors = [m for m in failures if "ValueError" in m and ": item " in m]
    key_errors = [m for m in failures if "KeyError" in m and ": item " in m]
    assert len(value_errors) == 1 and len(key_errors) == 1, failures
    assert f"{__file__}:" in value_errors[0] and "in explode" in value_errors[0]
    assert "odd item" in value_errors[0]
    summary = [m for m in failures if "all 10" in m]
    assert summary == [], "two different failures: not 'all failed the same way'"
    assert any("10 of 10" in m for m in failures), failures


def always_fails(ctx, x, index, items):
    return {}["missing"]


def test_a_batch_whose_every_item_failed_the_same_way_says_so(store_path, caplog):
    @durable_execution
    def handler(event, ctx):
        return ctx.map(list(range(6)), always_fails, name="lookups", config=TOLERANT).failure_count

    with caplog.at_level(logging.WARNING):
        assert handler.run(None, store=store_path, max_workers=2) == 6
    failures = [r.getMessage() for r in caplog.records if r.name == "durable_mp.failures"]
    assert sum("KeyError" in m and "failed" in m for m in failures) >= 1
    assert any("all 6 items of 'lookups' failed the same way" in m for m in failures), failures


# -- step retries -----------------------------------------------------------------------------
FLAKY = StepConfig(retry_strategy=create_retry_strategy(RetryStrategyConfig(
    max_attempts=3, initial_delay=Duration.from_seconds(1), jitter_strategy=JitterStrategy.NONE)))


def flaky(step_ctx):
    if step_ctx.attempt < 3:
        raise ConnectionError(f"attempt {step_ctx.attempt} lost the connection")
    return "ok"


@pytest.mark.parametrize("where", ["root", "branch"])
def test_each_retry_is_logged_with_attempt_of_max_and_delay(store_path, caplog, where):
    @durable_execution
    def handler(event, ctx):
        if where == "root":
            return ctx.step(flaky, config=FLAKY)
        return ctx.parallel([lambda c: c.step(flaky, config=FLAKY)]).get_results()[0]

    with caplog.at_level(logging.WARNING):
        assert handler.run(None, store=store_path, skip_time=True) in ("ok", ["ok"][0])
    retries = [r for r in caplog.records if "will retry" in r.getMessage()]
    assert [r.levelno for r in retries] == [logging.WARNING] * 2
    text = [r.getMessage() for r in retries]
    assert "attempt 1 of 3" in text[0] and "attempt 2 of 3" in text[1]
    assert "ConnectionError: attempt 1 lost the connection" in text[0]
    assert "in 1s" in text[0] and "in 2s" in text[1]
    assert "'flaky'" in text[0]


def test_a_fail_fast_map_says_every_item_that_ran_failed_alike(store_path, caplog):
    @durable_execution
    def handler(event, ctx):
        return ctx.map(list(range(40)), always_fails, name="fail-fast").failure_count

    with caplog.at_level(logging.WARNING):
        failed = handler.run(None, store=store_path, max_workers=2)
    failures = [r.getMessage() for r in caplog.records if r.name == "durable_mp.failures"]
    assert sum(": item " in m for m in failures) == 1, failures
    if failed > 1:  # the default completion stops starting items after the first failure
        assert any(f"every item of 'fail-fast' that ran failed the same way ({failed} of 40" in m
                   for m in failures), failures


def test_parallel_failures_are_named_by_branch_and_an_unnamed_map_by_its_function(store_path, caplog):
    def broken(ctx):
        raise OSError("disk gone")

    @durable_execution
    def handler(event, ctx):
        ctx.parallel([lambda c: 1, broken])
        ctx.map([1, 2], always_fails, config=TOLERANT)

    with caplog.at_level(logging.WARNING):
        handler.run(None, store=store_path)
    failures = [r.getMessage() for r in caplog.records if r.name == "durable_mp.failures"]
    assert any(m.startswith("Parallel: branch 1 failed: OSError: disk gone") for m in failures), failures
    assert any(re.match(r"always_fails: item [01] failed: KeyError", m) for m in failures), failures
    assert any(m.startswith("all 2 items of 'always_fails' failed the same way") for m in failures), failures


def test_worker_log_records_reach_the_driver_with_the_branch_identity(store_path, caplog):
    import logging

    @durable_execution
    def handler(event, ctx):
        def branch(i):
            def run(c):
                logging.getLogger("user.job").warning("hello from %d", i)
                c.logger.info("via context logger")
                return os.getpid()
            return run
        return ctx.parallel([branch(i) for i in range(3)]).get_results()

    with caplog.at_level(logging.INFO):
        pids = run_skip_time(handler, store_path)
    hello = sorted((r.getMessage(), r.branchIndex, r.process) for r in caplog.records if r.name == "user.job")
    assert [(m, b) for m, b, _ in hello] == [("hello from 0", 0), ("hello from 1", 1), ("hello from 2", 2)]
    assert {p for *_, p in hello} <= set(pids), "records keep the worker's pid"
    ctx_records = [r for r in caplog.records if r.getMessage() == "via context logger"]
    assert len(ctx_records) == 3 and all(r.parentId for r in ctx_records)
