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
from functools import partial
from types import BuiltinFunctionType, FunctionType, MethodType
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
    "handler(event, context)": "write `def handler(event, context)`; a plain f(item) over many items is "
                               "durable_mp.map(f, items)",
}

# Callables that fit, by ``_cache_key``: a map or step in a loop passes the same code object
# (or class) again and again, and ``inspect.signature`` costs 10-150 µs.
_FITS: set[tuple[Any, ...]] = set()


def _describe(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or type(func).__name__
    code = getattr(func, "__code__", None)
    if code is not None:
        return f"{name} ({code.co_filename}:{code.co_firstlineno})"
    return name


def _cache_key(func: Any, nargs: int) -> tuple[Any, ...] | None:
    """What a callable's fit depends on, when that is cheap to name; None: check it every time.

    A plain function: its code and defaults.  An instance of a class with ``__call__``
    (``durable_step``'s bound callables, ~150 µs for ``inspect.signature`` on a busy
    machine): its class, unless something sets ``__signature__``.
    """
    cls = type(func)
    if cls is FunctionType:
        return (func.__code__, len(func.__defaults__ or ()), tuple(func.__kwdefaults__ or ()), nargs)
    if isinstance(func, (type, partial, MethodType, BuiltinFunctionType)) or hasattr(func, "__signature__"):
        return None
    call = next((k.__dict__["__call__"] for k in cls.__mro__ if "__call__" in k.__dict__), None)
    if not isinstance(call, FunctionType):
        return None
    return (cls, nargs)


def check_callable(func: Any, nargs: int, expected: str, what: str) -> None:
    """Raise ``ValidationError`` unless ``func`` can be called with ``nargs`` positional arguments."""
    if not callable(func):
        raise ValidationError(f"{what} is not callable: {type(func).__name__}")
    key = _cache_key(func, nargs)
    if key is not None and key in _FITS:
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
