"""``durable_step``, ``durable_with_child_context``, ``durable_parallel_branch``.

The decorated function, called with its arguments, returns a *bound* callable that the
context runs later.  Bound callables are small module-level classes rather than
closures so they pickle cheaply (the user function itself goes through cloudpickle) and
carry ``_original_name``, which the context uses as the operation name.

The reference defines these in ``context``, which re-exports them from here; so this
module must not import ``context``: the functions it binds take the context as ``Any``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from durable_mp.config import ParallelBranch

T = TypeVar("T")


class _Bound:
    """``func`` with its call arguments fixed; called later with a context first."""

    __slots__ = ("func", "args", "kwargs", "_original_name")

    def __init__(self, func: Callable, args: tuple, kwargs: dict) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self._original_name = getattr(func, "__name__", None)

    def __call__(self, ctx: Any) -> Any:
        return self.func(ctx, *self.args, **self.kwargs)

    def __getstate__(self) -> tuple:
        return (self.func, self.args, self.kwargs)

    def __setstate__(self, state: tuple) -> None:
        _Bound.__init__(self, *state)


def durable_step(func: Callable[..., T]) -> Callable[..., Callable[[Any], T]]:
    """``@durable_step def work(step_ctx, x)`` → ``ctx.step(work(x))``, named ``"work"``."""

    @functools.wraps(func)
    def bind(*args: Any, **kwargs: Any) -> Callable[[Any], T]:
        return _Bound(func, args, kwargs)

    bind._original_name = func.__name__  # type: ignore[attr-defined]
    return bind


def durable_with_child_context(func: Callable[..., T]) -> Callable[..., Callable[[Any], T]]:
    """``@durable_with_child_context def f(ctx, x)`` → ``ctx.run_in_child_context(f(x))``."""

    @functools.wraps(func)
    def bind(*args: Any, **kwargs: Any) -> Callable[[Any], T]:
        return _Bound(func, args, kwargs)

    bind._original_name = func.__name__  # type: ignore[attr-defined]
    return bind


def durable_parallel_branch(name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., ParallelBranch[T]]]:
    """Decorator factory: ``@durable_parallel_branch("fetch") def f(ctx, x)``; ``f(x)`` is a branch."""

    def decorate(func: Callable[..., T]) -> Callable[..., ParallelBranch[T]]:
        @functools.wraps(func)
        def bind(*args: Any, **kwargs: Any) -> ParallelBranch[T]:
            return ParallelBranch(_Bound(func, args, kwargs), name)

        return bind

    return decorate


def durable_wait_for_callback(func: Callable[..., None]) -> Callable[..., Callable[[str, Any], None]]:
    """``@durable_wait_for_callback def submit(callback_id, cb_ctx, x)`` → ``ctx.wait_for_callback(submit(x))``."""

    @functools.wraps(func)
    def bind(*args: Any, **kwargs: Any) -> Callable[[str, Any], None]:
        return _BoundSubmitter(func, args, kwargs)

    bind._original_name = func.__name__  # type: ignore[attr-defined]
    return bind


class _BoundSubmitter(_Bound):
    """A submitter with its arguments fixed: called as ``(callback_id, context)``."""

    __slots__ = ()

    def __call__(self, callback_id: str, ctx: Any = None) -> Any:  # type: ignore[override]
        return self.func(callback_id, ctx, *self.args, **self.kwargs)
