"""Configuration objects, with the reference SDK's names, defaults and validation.

All are frozen dataclasses validated on construction, so a bad value raises
``ValidationError`` where the config is written, not deep inside a worker.  durable_mp
adds keyword-only ``timeout`` (``StepConfig``) and ``branch_timeout`` (``ParallelConfig``,
``MapConfig``): seconds, fractional allowed, enforced by the driver.

This module is a foundation: it imports only ``core``, ``exceptions`` and ``jitter``.  A
retry strategy's return value (``retries.RetryDecision``, which needs ``Duration``) is
named through the ``RetryVerdict`` protocol, and ``ParallelBranch`` lives here, with
the other values handed to ``parallel``, so that ``decorators`` need not import
``context``.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

from durable_mp.core.completion import (
    BatchItemStatus,
    CompletionDecision,
    CompletionItemStatus,
    CompletionOutcome,
    CompletionStatus,
    complete_batch,
    continue_batch,
)
from durable_mp.core.serdes_base import SerDes
from durable_mp.exceptions import ValidationError
from durable_mp.jitter import JitterStrategy

__all__ = [
    "BatchItemStatus", "CallbackConfig", "ChildConfig", "CompletionConfig", "CompletionDecision",
    "CompletionItemStatus", "CompletionOutcome", "CompletionStatus", "Duration", "InvokeConfig",
    "JitterStrategy", "MapConfig", "NestingType", "ParallelBranch", "ParallelConfig", "RetryVerdict",
    "StepConfig", "StepSemantics", "WaitForCallbackConfig", "complete_batch", "continue_batch", "timeout_seconds",
]

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")

SECONDS_PER_MINUTE = 60
SECONDS_PER_HOUR = 3600
SECONDS_PER_DAY = 86400
SUB_TYPE_MAX_LENGTH = 32
_SUB_TYPE_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-_")
MAX_PERCENTAGE = 100


class RetryVerdict(Protocol):
    """What a retry strategy returns, as the step loop reads it (``retries.RetryDecision``)."""

    @property
    def should_retry(self) -> bool: ...

    @property
    def delay_seconds(self) -> int: ...


RetryStrategy = Callable[[Exception, int], RetryVerdict]
SummaryGenerator = Callable[[Any], str]


@dataclass(frozen=True)
class Duration:
    """A span of whole seconds; ``from_*`` truncate, as the service only has seconds."""

    seconds: int = 0

    def __post_init__(self) -> None:
        if self.seconds < 0:
            raise ValidationError(f"Duration seconds must not be negative, got: {self.seconds}")

    def to_seconds(self) -> int:
        return self.seconds

    @classmethod
    def from_seconds(cls, value: float) -> Duration:
        return cls(seconds=int(value))

    @classmethod
    def from_minutes(cls, value: float) -> Duration:
        return cls(seconds=int(value * SECONDS_PER_MINUTE))

    @classmethod
    def from_hours(cls, value: float) -> Duration:
        return cls(seconds=int(value * SECONDS_PER_HOUR))

    @classmethod
    def from_days(cls, value: float) -> Duration:
        return cls(seconds=int(value * SECONDS_PER_DAY))


def timeout_seconds(value: float | Duration | None, what: str = "timeout") -> float | None:
    """Normalise a durable_mp timeout to float seconds; ``None`` means no limit.

    Raises ``ValidationError`` unless ``value`` is None or a finite number > 0
    (a ``Duration`` of 0 s is rejected too: it could never let anything run).
    """
    if value is None:
        return None
    if isinstance(value, Duration):
        seconds = float(value.seconds)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValidationError(f"{what} must be seconds (int/float) or a Duration, got: {value!r}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValidationError(f"{what} must be a finite number of seconds > 0, got: {value!r}")
    return seconds


def _validate_sub_type(sub_type: str | None) -> None:
    # None and "" both select the default sub-type.
    if not sub_type:
        return
    if len(sub_type) > SUB_TYPE_MAX_LENGTH or not set(sub_type) <= _SUB_TYPE_CHARACTERS:
        raise ValidationError(
            f"sub_type must be 1 to {SUB_TYPE_MAX_LENGTH} characters from A-Z, a-z, 0-9, "
            f"hyphen and underscore, got: {sub_type!r}"
        )


def _validate_max_concurrency(value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"max_concurrency must be an integer of at least 1, got: {value!r}")


class StepSemantics(Enum):
    """Whether an interrupted step attempt may run again (at-least-once) or not."""

    AT_MOST_ONCE_PER_RETRY = "AT_MOST_ONCE_PER_RETRY"
    AT_LEAST_ONCE_PER_RETRY = "AT_LEAST_ONCE_PER_RETRY"


class NestingType(Enum):
    """NESTED records a CONTEXT operation per branch; FLAT runs branches virtually."""

    NESTED = "NESTED"
    FLAT = "FLAT"


@dataclass(frozen=True)
class StepConfig:
    """How one step retries, serializes and (durable_mp) times out."""

    retry_strategy: RetryStrategy | None = None
    step_semantics: StepSemantics = StepSemantics.AT_LEAST_ONCE_PER_RETRY
    serdes: SerDes | None = None
    sub_type: str | None = field(default=None, kw_only=True)
    timeout: float | Duration | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        _validate_sub_type(self.sub_type)
        timeout_seconds(self.timeout, "StepConfig.timeout")

    @property
    def timeout_seconds(self) -> float | None:
        return timeout_seconds(self.timeout)


@dataclass(frozen=True)
class ChildConfig(Generic[T]):
    """How a child context serializes its result and appears in history."""

    serdes: SerDes | None = None
    sub_type: str | None = None
    summary_generator: SummaryGenerator | None = None
    is_virtual: bool = False

    def __post_init__(self) -> None:
        _validate_sub_type(self.sub_type)


class ParallelBranch(Generic[T]):
    """A parallel branch with an optional name (only affects history).

    ``func`` is called with the branch's ``DurableContext``.
    """

    def __init__(self, func: Callable[[Any], T], name: str | None = None) -> None:
        self.func = func
        self.name = name

    def __call__(self, ctx: Any) -> T:
        return self.func(ctx)

    def __repr__(self) -> str:
        return f"ParallelBranch({getattr(self.func, '__name__', self.func)!r}, name={self.name!r})"


@dataclass(frozen=True)
class CompletionConfig:
    """When a map/parallel stops: thresholds, or a custom ``should_complete`` predicate.

    No criteria at all means fail-fast (the first failure stops the batch).
    ``min_successful > len(items)`` is checked by ``CompletionPolicy``, which knows
    the item count.
    """

    min_successful: int | None = None
    tolerated_failure_count: int | None = None
    tolerated_failure_percentage: int | float | None = None
    should_complete: Callable[[CompletionStatus], CompletionDecision] | None = None

    def __post_init__(self) -> None:
        if self.min_successful is not None and self.min_successful < 1:
            raise ValidationError(f"min_successful must be at least 1, got: {self.min_successful}")
        if self.tolerated_failure_count is not None and self.tolerated_failure_count < 0:
            raise ValidationError(
                f"tolerated_failure_count must be non-negative, got: {self.tolerated_failure_count}"
            )
        pct = self.tolerated_failure_percentage
        if pct is not None and not 0 <= pct <= MAX_PERCENTAGE:
            raise ValidationError(f"tolerated_failure_percentage must be between 0 and 100, got: {pct}")
        if self.should_complete is None:
            return
        if not callable(self.should_complete):
            raise ValidationError(f"should_complete must be callable, got: {self.should_complete!r}")
        if self.has_thresholds:
            raise ValidationError(
                "should_complete cannot be combined with min_successful, "
                "tolerated_failure_count, or tolerated_failure_percentage"
            )

    @property
    def has_thresholds(self) -> bool:
        return (
            self.min_successful is not None
            or self.tolerated_failure_count is not None
            or self.tolerated_failure_percentage is not None
        )

    @staticmethod
    def first_successful() -> CompletionConfig:
        return CompletionConfig(min_successful=1)

    @staticmethod
    def all_completed() -> CompletionConfig:
        # 100 % tolerated: every item runs; all-None would mean fail-fast instead.
        return CompletionConfig(tolerated_failure_percentage=MAX_PERCENTAGE)

    @staticmethod
    def all_successful() -> CompletionConfig:
        return CompletionConfig(tolerated_failure_count=0, tolerated_failure_percentage=0)


@dataclass(frozen=True)
class ParallelConfig:
    """Concurrency, completion and serialization of ``context.parallel``."""

    max_concurrency: int | None = None
    completion_config: CompletionConfig = field(default_factory=CompletionConfig.all_successful)
    serdes: SerDes | None = None
    item_serdes: SerDes | None = None
    summary_generator: SummaryGenerator | None = None
    nesting_type: NestingType = NestingType.NESTED
    branch_timeout: float | Duration | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        _validate_max_concurrency(self.max_concurrency)
        timeout_seconds(self.branch_timeout, "ParallelConfig.branch_timeout")

    @property
    def branch_timeout_seconds(self) -> float | None:
        return timeout_seconds(self.branch_timeout)


@dataclass(frozen=True)
class MapConfig(Generic[T]):
    """Concurrency, completion and serialization of ``context.map``.

    The default ``CompletionConfig()`` is fail-fast, unlike parallel's all_successful.
    """

    max_concurrency: int | None = None
    completion_config: CompletionConfig = field(default_factory=CompletionConfig)
    serdes: SerDes | None = None
    item_serdes: SerDes | None = None
    summary_generator: SummaryGenerator | None = None
    nesting_type: NestingType = NestingType.NESTED
    item_namer: Callable[[T, int], str] | None = None
    branch_timeout: float | Duration | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        _validate_max_concurrency(self.max_concurrency)
        timeout_seconds(self.branch_timeout, "MapConfig.branch_timeout")

    @property
    def branch_timeout_seconds(self) -> float | None:
        return timeout_seconds(self.branch_timeout)


@dataclass(frozen=True)
class CallbackConfig:
    """Timeouts of a callback; a zero Duration means no timeout."""

    timeout: Duration = field(default_factory=Duration)
    heartbeat_timeout: Duration = field(default_factory=Duration)
    serdes: SerDes | None = None
    sub_type: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        _validate_sub_type(self.sub_type)

    @property
    def timeout_seconds(self) -> int:
        return self.timeout.to_seconds()

    @property
    def heartbeat_timeout_seconds(self) -> int:
        return self.heartbeat_timeout.to_seconds()


@dataclass(frozen=True)
class WaitForCallbackConfig(CallbackConfig):
    """CallbackConfig plus the retry strategy of the submitter step."""

    retry_strategy: RetryStrategy | None = None


@dataclass(frozen=True)
class InvokeConfig(Generic[P, R]):
    """Serialization of a chained invoke (plain JSON by default)."""

    serdes_payload: SerDes | None = None
    serdes_result: SerDes | None = None
    tenant_id: str | None = None
