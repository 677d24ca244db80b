"""A function whose signature cannot take what it will be given fails at once (issue 10, item 1).

The check runs before anything is recorded or dispatched; callables it cannot read, or that
fit, are let through.
"""

from __future__ import annotations

import functools

import pytest

from durable_mp import ExecutionFailedError, durable_execution
from durable_mp.store.facade import Store

pytestmark = pytest.mark.timeout(60)


def ops_of(store_path: str, execution_id: str) -> list:
    store = Store(store_path)
    try:
        return store.ops(execution_id)
    finally:
        store.close()


@durable_execution
def one_arg_map(event, ctx):
    return ctx.map([1, 2, 3], lambda x: x * 2).get_results()


@pytest.mark.process_free
def test_one_argument_map_function_fails_at_once_with_the_expected_signature(store_path):
    with pytest.raises(ExecutionFailedError) as info:
        one_arg_map.run(None, store=store_path, execution_id="sig-map")
    text = str(info.value)
    assert "ValidationError" in text
    assert "(ctx, item, index, items)" in text and "(x)" in text
    assert ops_of(store_path, "sig-map") == [], "nothing may be recorded or dispatched"


@durable_execution
def no_arg_step(event, ctx):
    return ctx.step(lambda: 5)


@pytest.mark.process_free
def test_step_function_without_step_context_fails_at_once(store_path):
    with pytest.raises(ExecutionFailedError) as info:
        no_arg_step.run(None, store=store_path, execution_id="sig-step")
    assert "ValidationError" in str(info.value) and "step_context" in str(info.value)
    assert ops_of(store_path, "sig-step") == [], "the step must not run (nor be retried)"


@durable_execution
def no_arg_branch(event, ctx):
    return ctx.parallel([lambda c: 1, lambda: 2]).get_results()


@pytest.mark.process_free
def test_parallel_branch_without_context_fails_at_once(store_path):
    with pytest.raises(ExecutionFailedError) as info:
        no_arg_branch.run(None, store=store_path, execution_id="sig-par")
    assert "parallel branch 1" in str(info.value) and "(ctx)" in str(info.value)
    assert ops_of(store_path, "sig-par") == []


class Unreadable:
    """A callable whose signature ``inspect.signature`` cannot read: it must be let through."""

    __signature__ = "not a signature"

    def __call__(self, *args):
        return len(args)


def add(step_ctx, a, b=0):
    return a + b


def test_callables_that_fit_or_cannot_be_read_are_let_through(store_path):
    @durable_execution
    def handler(event, ctx):
        return [
            ctx.step(Unreadable()),
            ctx.step(functools.partial(add, a=2, b=3)),
            ctx.step(lambda *args: len(args)),
            ctx.map([1, 2], lambda c, x, *rest: x + len(rest)).get_results(),
            ctx.map([1], Unreadable()).get_results(),
        ]

    assert handler.run(None, store=store_path) == [1, 5, 1, [3, 4], [4]]


@durable_execution
def no_arg_child(event, ctx):
    return ctx.run_in_child_context(lambda: 3)


@pytest.mark.process_free
def test_child_context_function_without_context_fails_at_once(store_path):
    with pytest.raises(ExecutionFailedError) as info:
        no_arg_child.run(None, store=store_path, execution_id="sig-child")
    assert "child context function" in str(info.value) and "func(ctx)" in str(info.value)
    assert ops_of(store_path, "sig-child") == []


@pytest.mark.process_free
def test_signature_checks_of_a_callable_class_are_cached_per_class():
    from durable_mp.decorators import durable_step
    from durable_mp.operation import signature

    @durable_step
    def work(step_ctx, x):
        return x

    signature.check_step(work(1))
    key = signature._cache_key(work(2), 1)
    assert key is not None and key in signature._FITS
    assert signature._cache_key(functools.partial(add, 1), 1) is None  # depends on the bound arguments
