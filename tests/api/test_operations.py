"""The durable operations at the root of a handler: step, wait, child context,
wait_for_condition, with_retry, and the decorators that name them.  A real store."""

from __future__ import annotations

import pytest

from durable_mp import (
    DurableContext,
    ParallelBranch,
    StepContext,
    durable_execution,
    durable_parallel_branch,
    durable_step,
    durable_with_child_context,
)
from durable_mp.config import Duration, StepConfig
from durable_mp.retries import JitterStrategy, RetryStrategyConfig, create_retry_strategy
from util import run_skip_time

pytestmark = pytest.mark.timeout(60)


@pytest.mark.process_free
def test_step_failure_after_retries_raises_step_error_at_root(store_path):
    @durable_execution
    def handler(event, ctx):
        cfg = StepConfig(retry_strategy=create_retry_strategy(RetryStrategyConfig(max_attempts=2)))
        try:
            ctx.step(lambda _: (_ for _ in ()).throw(ConnectionError("always")), name="s", config=cfg)
        except Exception as exc:  # noqa: BLE001
            return type(exc).__name__, exc.error_type, exc.message, type(exc.__cause__).__name__

    assert run_skip_time(handler, store_path) == ("StepError", "ConnectionError", "always", "DurableOperationError")


@pytest.mark.process_free
def test_wait_and_child_context_replay(store_path, tmp_path):
    marker = tmp_path / "steps"

    @durable_execution
    def handler(event, ctx):
        def count(_):
            with open(marker, "a") as f:
                f.write("x")
            return 1
        a = ctx.step(count, name="a")
        ctx.wait(Duration.from_seconds(5), name="pause")
        b = ctx.run_in_child_context(lambda c: c.step(count, name="b") + 1, name="child")
        return a + b

    assert run_skip_time(handler, store_path) == 3
    assert marker.read_text() == "xx"


@pytest.mark.process_free
def test_wait_for_condition_polls_until_the_strategy_stops(store_path):
    from durable_mp.waits import WaitForConditionConfig, WaitStrategyConfig, create_wait_strategy

    @durable_execution
    def handler(event, ctx):
        strategy = create_wait_strategy(WaitStrategyConfig(should_continue_polling=lambda s: s < 4,
                                                           jitter_strategy=JitterStrategy.NONE))
        cfg = WaitForConditionConfig(wait_strategy=strategy, initial_state=0)
        return ctx.wait_for_condition(lambda state, check_ctx: state + 1, cfg, name="poll")

    assert run_skip_time(handler, store_path) == 4
    from durable_mp.store.facade import Store
    with Store(store_path) as st:
        rec = next(r for r in st.ops(handler.execution_id_for(None)) if r.name == "poll")
    assert (rec.op_type, rec.sub_type, rec.status, rec.attempt) == ("STEP", "WaitForCondition", "SUCCEEDED", 4)


@pytest.mark.process_free
def test_with_retry_reruns_a_block_of_operations(store_path):
    from durable_mp.retries import WithRetryConfig, with_retry

    @durable_execution
    def handler(event, ctx):
        def block(c, attempt):
            value = c.step(lambda _: attempt, name=f"try-{attempt}")
            if value < 3:
                raise RuntimeError(f"attempt {value} not good enough")
            return value

        cfg = WithRetryConfig(retry_strategy=create_retry_strategy(RetryStrategyConfig(max_attempts=5)))
        return with_retry(ctx, block, cfg, name="block")

    assert run_skip_time(handler, store_path) == 3


def test_decorators_name_operations(store_path):
    @durable_step
    def double(step_ctx: StepContext, x: int) -> int:
        return 2 * x

    @durable_with_child_context
    def child(c: DurableContext, x: int) -> int:
        return c.step(double(x)) + 1

    @durable_parallel_branch("the-branch")
    def branch(c: DurableContext, x: int) -> int:
        return c.step(double(x))

    @durable_execution
    def handler(event, ctx):
        a = ctx.step(double(5))
        b = ctx.run_in_child_context(child(10))
        r = ctx.parallel([branch(1), ParallelBranch(lambda c: 7, "seven")])
        return a, b, r.get_results()

    assert run_skip_time(handler, store_path) == (10, 21, [2, 7])
    from durable_mp.store.facade import Store
    with Store(store_path) as st:
        names = {rec.name for rec in st.ops(handler.execution_id_for(None))}
    assert {"double", "child", "the-branch", "seven"} <= names
