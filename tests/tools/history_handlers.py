"""Handlers whose histories are compared with the reference's, written once for both SDKs.

``handlers(sdk)`` builds them against ``"aws_durable_execution_sdk_python"`` (to record
the reference's history, ``record_reference_history.py``) or ``"durable_mp"`` (the test,
``tests/inspect/test_history_reference.py``).  Only names both packages export are used, so the
two runs execute the same code.  Every step result is a JSON value, so both SDKs store
the same payload text.
"""

from __future__ import annotations

import datetime
import decimal
import importlib
import json
from collections.abc import Callable
from typing import Any

CALLBACK_RESULT = '"approved"'  # what the sender passes to the callback handlers
WAIT_SECONDS = 1  # a short durable wait (the reference's runner skips it; durable_mp sleeps it)
CALLBACK_TIMEOUT_SECONDS = 1


def handlers(sdk: str) -> dict[str, Callable[[Any, Any], Any]]:
    """name -> plain ``handler(event, context)`` (not yet wrapped by ``durable_execution``)."""
    config = importlib.import_module(f"{sdk}.config")
    retries = importlib.import_module(f"{sdk}.retries")
    waits = importlib.import_module(f"{sdk}.waits")
    Duration, StepConfig = config.Duration, config.StepConfig

    def step(event: Any, ctx: Any) -> Any:
        return ctx.step(lambda sc: {"n": 1, "s": "one"}, name="compute")

    attempts = {"n": 0}

    def flaky(sc: Any) -> str:
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise ValueError(f"flaky failure {attempts['n']}")
        return "ok"

    def retry(event: Any, ctx: Any) -> Any:
        strategy = retries.create_retry_strategy(retries.RetryStrategyConfig(
            max_attempts=3, initial_delay=Duration.from_seconds(1), backoff_rate=1.0,
            jitter_strategy=retries.JitterStrategy.NONE))
        return ctx.step(flaky, name="flaky", config=StepConfig(retry_strategy=strategy))

    def step_failure(event: Any, ctx: Any) -> Any:
        strategy = retries.create_retry_strategy(retries.RetryStrategyConfig(max_attempts=1))

        def boom(sc: Any) -> None:
            raise RuntimeError("boom")

        try:
            ctx.step(boom, name="boom", config=StepConfig(retry_strategy=strategy))
        except Exception as exc:  # noqa: BLE001 - the handler reports what it caught
            return type(exc).__name__
        return "no error"

    def execution_failure(event: Any, ctx: Any) -> Any:
        def body(c: Any) -> Any:
            c.step(lambda sc: 1, name="fine")
            raise KeyError("missing")

        return ctx.run_in_child_context(body, name="doomed")

    def child(event: Any, ctx: Any) -> Any:
        def body(c: Any) -> Any:
            a = c.step(lambda sc: 1, name="a")
            b = c.step(lambda sc: 2, name="b")
            return a + b

        return ctx.run_in_child_context(body, name="child")

    def parallel(event: Any, ctx: Any) -> Any:
        def one(c: Any) -> Any:
            return c.step(lambda sc: "one", name="s1")

        def two(c: Any) -> Any:
            return "two"

        return ctx.parallel([one, two], name="p").get_results()

    def map_(event: Any, ctx: Any) -> Any:
        def double(c: Any, item: int, index: int, items: list) -> Any:
            return c.step(lambda sc: item * 2, name=f"double-{index}")

        return ctx.map([1, 2, 3], double, name="m").get_results()

    def wait(event: Any, ctx: Any) -> Any:
        ctx.wait(Duration.from_seconds(WAIT_SECONDS), name="pause")
        return "waited"

    def wait_for_condition(event: Any, ctx: Any) -> Any:
        def check(state: int, check_ctx: Any) -> int:
            return state + 1

        def strategy(state: int, attempt: int) -> Any:
            if state >= 2:
                return waits.WaitForConditionDecision.stop_polling()
            return waits.WaitForConditionDecision.continue_waiting(Duration.from_seconds(1))

        return ctx.wait_for_condition(check, config=waits.WaitForConditionConfig(
            wait_strategy=strategy, initial_state=0), name="poll")

    def callback(event: Any, ctx: Any) -> Any:
        cb = ctx.create_callback(name="approval", config=config.CallbackConfig(
            timeout=Duration.from_seconds(60), heartbeat_timeout=Duration.from_seconds(30)))
        return cb.result()

    def callback_timeout(event: Any, ctx: Any) -> Any:
        cb = ctx.create_callback(name="late", config=config.CallbackConfig(
            timeout=Duration.from_seconds(CALLBACK_TIMEOUT_SECONDS)))
        try:
            return cb.result()
        except Exception as exc:  # noqa: BLE001 - the handler reports what it caught
            return [type(exc).__name__, str(exc)]

    def wait_for_callback(event: Any, ctx: Any) -> Any:
        def submit(callback_id: str, cb_ctx: Any) -> None:
            return None

        return ctx.wait_for_callback(submit, name="external")

    out = {"step": step, "retry": retry, "step_failure": step_failure, "child": child,
           "execution_failure": execution_failure,
           "parallel": parallel, "map": map_, "wait": wait, "wait_for_condition": wait_for_condition,
           "callback": callback, "callback_timeout": callback_timeout,
           "wait_for_callback": wait_for_callback}
    out.update(_more_handlers(sdk))
    return out


def _flaky_strategy(retries: Any, Duration: Any, attempts: int = 3) -> Any:
    """Retries after 1 s, no jitter: both SDKs record the same delays."""
    return retries.create_retry_strategy(retries.RetryStrategyConfig(
        max_attempts=attempts, initial_delay=Duration.from_seconds(1), backoff_rate=1.0,
        jitter_strategy=retries.JitterStrategy.NONE))


def _flaky(tries: dict, key: Any, fail_times: int = 2) -> Callable[[Any], str]:
    """A step body failing its first ``fail_times`` attempts (counted per ``key`` in this process)."""
    def body(sc: Any) -> str:
        tries[key] = tries.get(key, 0) + 1
        if tries[key] <= fail_times:
            raise ValueError(f"flaky {key} failure {tries[key]}")
        return f"ok {key}"

    return body


def _more_handlers(sdk: str) -> dict[str, Callable[[Any, Any], Any]]:
    """Operation types crossed with retries, failures, completion configs, serdes and nesting."""
    config = importlib.import_module(f"{sdk}.config")
    retries = importlib.import_module(f"{sdk}.retries")
    waits = importlib.import_module(f"{sdk}.waits")
    serdes_mod = importlib.import_module(f"{sdk}.serdes")
    models = importlib.import_module(f"{sdk}.concurrency.models")
    Duration, StepConfig, StepSemantics = config.Duration, config.StepConfig, config.StepSemantics
    MapConfig, ParallelConfig, CompletionConfig = config.MapConfig, config.ParallelConfig, config.CompletionConfig
    FLAT, ChildConfig, ParallelBranch = config.NestingType.FLAT, config.ChildConfig, config.ParallelBranch
    BatchResult = models.BatchResult
    tries: dict = {}

    class Tagged(serdes_mod.SerDes):
        """A custom serdes whose text differs from both defaults (and handles a BatchResult)."""

        def serialize(self, value: Any, serdes_context: Any) -> str:
            if hasattr(value, "to_dict"):
                value = {"batch": value.to_dict()}
            return "tagged:" + json.dumps(value, sort_keys=True)

        def deserialize(self, data: str, serdes_context: Any) -> Any:
            value = json.loads(data[len("tagged:"):])
            if isinstance(value, dict) and "batch" in value:
                return BatchResult.from_dict(value["batch"])
            return value

    def flaky_step(ctx: Any, key: Any, semantics: Any = None, fail_times: int = 2, attempts: int = 3) -> Any:
        cfg = StepConfig(retry_strategy=_flaky_strategy(retries, Duration, attempts))
        if semantics is not None:
            cfg = StepConfig(retry_strategy=cfg.retry_strategy, step_semantics=semantics)
        return ctx.step(_flaky(tries, key, fail_times), name=f"flaky-{key}", config=cfg)

    def summary(batch: Any) -> Any:
        return {"results": batch.get_results(), "failed": batch.failure_count, "ok": batch.success_count,
                "reason": batch.completion_reason.value, "status": batch.status.value}

    def double(c: Any, item: int, index: int, items: list) -> Any:
        return c.step(lambda sc: item * 2, name=f"double-{index}")

    def fails_odd(c: Any, item: int, index: int, items: list) -> Any:
        def body(sc: Any) -> Any:
            if item % 2:
                raise RuntimeError(f"odd item {item}")
            return item

        return c.step(body, name=f"check-{index}",
                      config=StepConfig(retry_strategy=retries.create_retry_strategy(
                          retries.RetryStrategyConfig(max_attempts=1))))

    def one_by_one(**kw: Any) -> Any:
        return MapConfig(max_concurrency=1, **kw)

    h: dict[str, Callable[[Any, Any], Any]] = {}

    # -- retries ---------------------------------------------------------------------------
    h["retry_in_child"] = lambda e, ctx: ctx.run_in_child_context(lambda c: flaky_step(c, "child"), name="outer")
    h["retry_at_most_once"] = lambda e, ctx: flaky_step(ctx, "amo", StepSemantics.AT_MOST_ONCE_PER_RETRY)
    h["retry_at_most_once_in_child"] = lambda e, ctx: ctx.run_in_child_context(
        lambda c: flaky_step(c, "amo-child", StepSemantics.AT_MOST_ONCE_PER_RETRY), name="outer")

    def retry_exhausted(event: Any, ctx: Any) -> Any:
        try:
            return flaky_step(ctx, "never", fail_times=5, attempts=2)
        except Exception as exc:  # noqa: BLE001 - the handler reports what it caught
            return type(exc).__name__

    h["retry_exhausted"] = retry_exhausted
    h["retry_in_parallel"] = lambda e, ctx: ctx.parallel(
        [lambda c: flaky_step(c, "branch"), lambda c: "steady"], name="p").get_results()
    h["retry_in_map_flat"] = lambda e, ctx: ctx.map(
        [0, 1], lambda c, item, i, items: flaky_step(c, f"item{item}", fail_times=item), name="m",
        config=MapConfig(nesting_type=FLAT)).get_results()

    # -- wait_for_condition ----------------------------------------------------------------
    def poll_until(limit: int, delay: int = 1) -> Any:
        def strategy(state: Any, attempt: int) -> Any:
            if state["n"] >= limit:
                return waits.WaitForConditionDecision.stop_polling()
            return waits.WaitForConditionDecision.continue_waiting(Duration.from_seconds(delay))

        return waits.WaitForConditionConfig(wait_strategy=strategy, initial_state={"n": 0, "seen": []})

    def grow(state: Any, check_ctx: Any) -> Any:
        return {"n": state["n"] + 1, "seen": state["seen"] + [state["n"]]}

    h["wait_for_condition_states"] = lambda e, ctx: ctx.wait_for_condition(grow, config=poll_until(3), name="poll")
    h["wait_for_condition_in_child"] = lambda e, ctx: ctx.run_in_child_context(
        lambda c: c.wait_for_condition(grow, config=poll_until(2), name="poll"), name="outer")

    def bad_check(state: Any, check_ctx: Any) -> Any:
        if state["n"] >= 1:
            raise RuntimeError("sensor broke")
        return grow(state, check_ctx)

    def wait_for_condition_failure(event: Any, ctx: Any) -> Any:
        try:
            return ctx.wait_for_condition(bad_check, config=poll_until(5), name="poll")
        except Exception as exc:  # noqa: BLE001
            return type(exc).__name__

    h["wait_for_condition_failure"] = wait_for_condition_failure
    h["wait_for_condition_in_parallel"] = lambda e, ctx: ctx.parallel(
        [lambda c: c.wait_for_condition(grow, config=poll_until(2), name="poll")], name="p").get_results()

    # -- custom serdes ---------------------------------------------------------------------
    h["step_serdes"] = lambda e, ctx: ctx.step(lambda sc: {"a": [1, 2]}, name="s",
                                               config=StepConfig(serdes=Tagged()))
    h["child_serdes"] = lambda e, ctx: ctx.run_in_child_context(
        lambda c: c.step(lambda sc: 3, name="s") * 2, name="c", config=ChildConfig(serdes=Tagged()))
    h["map_serdes"] = lambda e, ctx: ctx.map([1, 2], double, name="m",
                                             config=MapConfig(serdes=Tagged())).get_results()
    h["map_item_serdes"] = lambda e, ctx: ctx.map([1, 2], double, name="m",
                                                  config=MapConfig(item_serdes=Tagged())).get_results()
    h["parallel_serdes"] = lambda e, ctx: ctx.parallel([lambda c: "x", lambda c: {"y": 1}], name="p",
                                                       config=ParallelConfig(serdes=Tagged())).get_results()
    h["parallel_both_serdes"] = lambda e, ctx: ctx.parallel(
        [lambda c: "x", lambda c: [1]], name="p",
        config=ParallelConfig(serdes=Tagged(), item_serdes=serdes_mod.JsonSerDes())).get_results()
    h["map_flat_serdes"] = lambda e, ctx: ctx.map([1, 2], double, name="m",
                                                  config=MapConfig(serdes=Tagged(), nesting_type=FLAT)).get_results()

    # -- failures and completion configs ---------------------------------------------------
    h["map_all_completed"] = lambda e, ctx: summary(ctx.map(
        [1, 2, 3], fails_odd, name="m", config=MapConfig(completion_config=CompletionConfig.all_completed())))
    h["map_fail_fast"] = lambda e, ctx: summary(ctx.map([2, 1, 4], fails_odd, name="m", config=one_by_one()))
    h["map_first_successful"] = lambda e, ctx: summary(ctx.map(
        [1, 2], fails_odd, name="m", config=one_by_one(completion_config=CompletionConfig.first_successful())))
    h["map_tolerated_count"] = lambda e, ctx: summary(ctx.map(
        [1, 3, 2, 5, 4], fails_odd, name="m",
        config=one_by_one(completion_config=CompletionConfig(tolerated_failure_count=1))))
    h["map_tolerated_percentage"] = lambda e, ctx: summary(ctx.map(
        [1, 2, 4, 6], fails_odd, name="m",
        config=one_by_one(completion_config=CompletionConfig(tolerated_failure_percentage=50))))

    def raises(c: Any) -> Any:
        raise ValueError("branch broke")

    h["parallel_failure"] = lambda e, ctx: summary(ctx.parallel(
        [raises, lambda c: "fine"], name="p", config=ParallelConfig(max_concurrency=1)))
    h["parallel_all_completed"] = lambda e, ctx: summary(ctx.parallel(
        [lambda c: "a", raises, lambda c: c.step(lambda sc: "b", name="b")], name="p",
        config=ParallelConfig(completion_config=CompletionConfig.all_completed())))
    h["parallel_first_successful"] = lambda e, ctx: summary(ctx.parallel(
        [raises, lambda c: "second"], name="p",
        config=ParallelConfig(max_concurrency=1, completion_config=CompletionConfig.first_successful())))
    h["parallel_named"] = lambda e, ctx: ctx.parallel(
        [ParallelBranch(lambda c: 1, name="left"), ParallelBranch(lambda c: 2, name="right")], name="p").get_results()
    h["map_item_namer"] = lambda e, ctx: ctx.map([5, 6], double, name="m", config=MapConfig(
        item_namer=lambda item, i: f"item-{item}")).get_results()
    h["map_empty"] = lambda e, ctx: summary(ctx.map([], double, name="m"))

    def step_failure_in_child(event: Any, ctx: Any) -> Any:
        def body(c: Any) -> Any:
            return c.step(lambda sc: 1 // 0, name="divide", config=StepConfig(
                retry_strategy=retries.create_retry_strategy(retries.RetryStrategyConfig(max_attempts=1))))

        try:
            return ctx.run_in_child_context(body, name="c")
        except Exception as exc:  # noqa: BLE001
            return type(exc).__name__

    h["step_failure_in_child"] = step_failure_in_child
    h["wait_in_child"] = lambda e, ctx: ctx.run_in_child_context(
        lambda c: c.wait(Duration.from_seconds(WAIT_SECONDS), name="pause") or "done", name="c")
    h["map_in_child"] = lambda e, ctx: ctx.run_in_child_context(
        lambda c: c.map([1, 2], double, name="m").get_results(), name="c")
    h["parallel_in_map"] = lambda e, ctx: ctx.map(
        [1, 2], lambda c, item, i, items: c.parallel([lambda b: item, lambda b: -item], name=f"p{i}").get_results(),
        name="m").get_results()

    # -- FLAT nesting ----------------------------------------------------------------------
    h["map_flat"] = lambda e, ctx: ctx.map([1, 2, 3], double, name="m",
                                           config=MapConfig(nesting_type=FLAT)).get_results()
    h["parallel_flat"] = lambda e, ctx: ctx.parallel(
        [lambda c: c.step(lambda sc: "one", name="s1"), lambda c: "two"], name="p",
        config=ParallelConfig(nesting_type=FLAT)).get_results()
    h["map_flat_failure"] = lambda e, ctx: summary(ctx.map(
        [1, 2, 3], fails_odd, name="m",
        config=MapConfig(nesting_type=FLAT, completion_config=CompletionConfig.all_completed())))
    h["parallel_flat_failure"] = lambda e, ctx: summary(ctx.parallel(
        [raises, lambda c: c.step(lambda sc: "s", name="s")], name="p",
        config=ParallelConfig(nesting_type=FLAT, max_concurrency=1,
                              completion_config=CompletionConfig.all_completed())))
    h["parallel_flat_child"] = lambda e, ctx: ctx.parallel(
        [lambda c: c.run_in_child_context(lambda cc: cc.step(lambda sc: 7, name="inner"), name="kid"),
         lambda c: c.step(lambda sc: 8, name="direct")], name="p",
        config=ParallelConfig(nesting_type=FLAT)).get_results()
    h["map_flat_two_steps"] = lambda e, ctx: ctx.map(
        [1, 2], lambda c, item, i, items: c.step(lambda sc: item, name=f"a{i}") + c.step(lambda sc: 10, name=f"b{i}"),
        name="m", config=MapConfig(nesting_type=FLAT)).get_results()
    h["map_flat_in_flat"] = lambda e, ctx: ctx.map(
        [1, 2], lambda c, item, i, items: c.map([item], double, name=f"inner{i}",
                                                config=MapConfig(nesting_type=FLAT)).get_results(),
        name="m", config=MapConfig(nesting_type=FLAT)).get_results()
    h["map_flat_first_successful"] = lambda e, ctx: summary(ctx.map(
        [1, 2], fails_odd, name="m",
        config=one_by_one(nesting_type=FLAT, completion_config=CompletionConfig.first_successful())))
    h["parallel_flat_wait"] = lambda e, ctx: ctx.parallel(
        [lambda c: c.wait(Duration.from_seconds(WAIT_SECONDS), name="nap") or "rested"], name="p",
        config=ParallelConfig(nesting_type=FLAT)).get_results()
    h["wait_for_condition_in_flat_parallel"] = lambda e, ctx: ctx.parallel(
        [lambda c: c.wait_for_condition(grow, config=poll_until(2), name="poll"), lambda c: "quick"], name="p",
        config=ParallelConfig(nesting_type=FLAT)).get_results()
    h["map_nested_with_flat_inner"] = lambda e, ctx: ctx.map(
        [1, 2], lambda c, item, i, items: c.map([item, item + 10], double, name=f"inner{i}",
                                                config=MapConfig(nesting_type=FLAT)).get_results(),
        name="m").get_results()

    def extended_types(event: Any, ctx: Any) -> Any:
        value = ctx.step(lambda sc: {"pair": (1, 2), "price": decimal.Decimal("1.50"), "raw": b"hi",
                                     "day": datetime.date(2020, 1, 2)}, name="typed")
        return sorted(value)

    h["step_extended_types"] = extended_types
    return h


# handlers that wait for a callback: the recorder / test completes it with CALLBACK_RESULT
NEEDS_CALLBACK = frozenset({"callback", "wait_for_callback"})
