"""Contexts handed to user callables that may not run durable operations themselves.

A step body gets only a logger and its attempt number: it runs inside one attempt, so
nesting durable operations there would have nothing to checkpoint against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "LoggerInterface", "OperationContext", "StepContext", "SummaryGenerator",
    "WaitForCallbackContext", "WaitForConditionCheckContext",
]

SummaryGenerator = Callable[[Any], str]


@runtime_checkable
class LoggerInterface(Protocol):
    """What ``context.logger`` and ``set_logger`` need from a logger."""

    def debug(self, msg: object, *args: object, extra: Mapping[str, object] | None = None) -> None: ...

    def info(self, msg: object, *args: object, extra: Mapping[str, object] | None = None) -> None: ...

    def warning(self, msg: object, *args: object, extra: Mapping[str, object] | None = None) -> None: ...

    def error(self, msg: object, *args: object, extra: Mapping[str, object] | None = None) -> None: ...

    def exception(self, msg: object, *args: object, extra: Mapping[str, object] | None = None) -> None: ...


@dataclass(frozen=True)
class OperationContext:
    logger: LoggerInterface


@dataclass(frozen=True)
class StepContext(OperationContext):
    """Passed to a step body; ``attempt`` starts at 1."""

    attempt: int = 1


@dataclass(frozen=True)
class WaitForConditionCheckContext(OperationContext):
    """Passed to a wait_for_condition check; ``attempt`` starts at 1."""

    attempt: int


@dataclass(frozen=True)
class WaitForCallbackContext(OperationContext):
    """Passed to a wait_for_callback submitter."""
