"""Refuse a callable that cannot take the arguments an operation will pass it, before it runs.

Without this check a one-argument map function (``lambda x: x * 2``) fails in every
worker with a ``TypeError`` that only shows up as failed items, and a step function
without the step-context parameter (``lambda: 5``) is retried by the default strategy
for a minute.  The check binds placeholder arguments to ``inspect.signature``; callables
whose signature cannot be read (some builtins, C extensions) are let through.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import FunctionType
from typing import Any

from durable_mp.core.errors import ValidationError

STEP = "func(step_context)"
CHILD = "func(ctx)"
BRANCH = "func(ctx)"
MAP = "func(ctx, item, index, items)"

_HINTS = {
    STEP: "write `lambda step_context: ...` or `def work(step_context)`",
    BRANCH: "write `lambda ctx: ...` or `def branch(ctx)`",
    MAP: "write `def f(ctx, item, index, items)`, or use durable_mp.map(f, items) for a plain f(item)",
}

# Plain functions that fit, by (code, number of defaults, keyword-only defaults, arity): a map
# or step in a loop passes the same code object again and again, and binding costs ~10 µs.
_FITS: set[tuple[Any, ...]] = set()


def _describe(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or type(func).__name__
    code = getattr(func, "__code__", None)
    if code is not None:
        return f"{name} ({code.co_filename}:{code.co_firstlineno})"
    return name


def check_callable(func: Any, nargs: int, expected: str, what: str) -> None:
    """Raise ``ValidationError`` unless ``func`` can be called with ``nargs`` positional arguments."""
    if not callable(func):
        raise ValidationError(f"{what} is not callable: {type(func).__name__}")
    key = None
    if type(func) is FunctionType:
        key = (func.__code__, len(func.__defaults__ or ()), tuple(func.__kwdefaults__ or ()), nargs)
        if key in _FITS:
            return
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # unreadable (builtins, C extensions): let it run
        return
    try:
        signature.bind(*([None] * nargs))
    except TypeError as exc:
        hint = _HINTS.get(expected, f"({exc})")
        raise ValidationError(
            f"{what} {_describe(func)} takes {signature}, but is called as {expected}: {hint}") from None
    if key is not None:
        _FITS.add(key)


def check_step(func: Callable[..., Any]) -> None:
    check_callable(func, 1, STEP, "step function")


def check_child(func: Callable[..., Any]) -> None:
    check_callable(func, 1, CHILD, "child context function")


def check_branch(func: Callable[..., Any], index: int) -> None:
    check_callable(func, 1, BRANCH, f"parallel branch {index}")


def check_map(func: Callable[..., Any]) -> None:
    check_callable(func, 4, MAP, "map function")


__all__ = ["check_branch", "check_callable", "check_child", "check_map", "check_step"]
