"""Handlers whose histories are compared with the reference's, written once for both SDKs.

``handlers(sdk)`` builds them against ``"aws_durable_execution_sdk_python"`` (to record
the reference's history, ``record_reference_history.py``) or ``"durable_mp"`` (the test,
``tests/inspect/test_history_reference.py``).  Only names both packages export are used, so the
two runs execute the same code.  Every step result is a JSON value, so both SDKs store
the same payload text.
"""

from __future__ import annotations

import importlib
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

    return {"step": step, "retry": retry, "step_failure": step_failure, "child": child,
            "execution_failure": execution_failure,
            "parallel": parallel, "map": map_, "wait": wait, "wait_for_condition": wait_for_condition,
            "callback": callback, "callback_timeout": callback_timeout,
            "wait_for_callback": wait_for_callback}


# handlers that wait for a callback: the recorder / test completes it with CALLBACK_RESULT
NEEDS_CALLBACK = frozenset({"callback", "wait_for_callback"})
