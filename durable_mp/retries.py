"""Retry strategies: ``(error, attempts_made) -> RetryDecision`` callables.

``attempts_made`` counts the attempts so far including the one that just failed, so
``max_attempts`` is the total number of executions.  Delays are whole seconds, at least
one.  Every factory takes an optional ``rng`` so tests get deterministic jitter.

``with_retry`` lives here as in the reference, but this module is a foundation below
``context``: it uses a context only through ``RetryContext``, the two methods it calls.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from durable_mp.config import ChildConfig, Duration
from durable_mp.core.text import safe_str
from durable_mp.jitter import JitterStrategy, exponential_delay

__all__ = [
    "JitterStrategy", "LinearRetryStrategyConfig", "RetryContext", "RetryDecision", "RetryPresets",
    "RetryStrategyConfig", "WithRetryConfig", "create_linear_retry_strategy",
    "create_retry_strategy", "with_retry",
]

T = TypeVar("T")
Numeric = int | float
RetryStrategy = Callable[[Exception, int], "RetryDecision"]
ErrorPatterns = list[str | re.Pattern]
ErrorTypes = list[type[Exception]]

_MATCH_ALL = re.compile(r".*")


@dataclass
class RetryDecision:
    """Whether to retry, and after how long."""

    should_retry: bool
    delay: Duration

    @property
    def delay_seconds(self) -> int:
        return self.delay.to_seconds()

    @classmethod
    def retry(cls, delay: Duration) -> RetryDecision:
        return cls(should_retry=True, delay=delay)

    @classmethod
    def no_retry(cls) -> RetryDecision:
        return cls(should_retry=False, delay=Duration())


@dataclass
class RetryStrategyConfig:
    """Exponential backoff: ``initial_delay * backoff_rate ** (attempt - 1)``, capped."""

    max_attempts: int = 3
    initial_delay: Duration = field(default_factory=lambda: Duration.from_seconds(5))
    max_delay: Duration = field(default_factory=lambda: Duration.from_minutes(5))
    backoff_rate: Numeric = 2.0
    jitter_strategy: JitterStrategy = JitterStrategy.FULL
    retryable_errors: ErrorPatterns | None = None
    retryable_error_types: ErrorTypes | None = None

    @property
    def initial_delay_seconds(self) -> int:
        return self.initial_delay.to_seconds()

    @property
    def max_delay_seconds(self) -> int:
        return self.max_delay.to_seconds()


@dataclass
class LinearRetryStrategyConfig:
    """Linear backoff: ``initial_delay + increment * (attempt - 1)``, capped."""

    max_attempts: int = 6
    initial_delay: Duration = field(default_factory=lambda: Duration.from_seconds(1))
    increment: Duration = field(default_factory=lambda: Duration.from_seconds(1))
    max_delay: Duration = field(default_factory=lambda: Duration.from_minutes(5))
    jitter_strategy: JitterStrategy = JitterStrategy.FULL
    retryable_errors: ErrorPatterns | None = None
    retryable_error_types: ErrorTypes | None = None

    @property
    def initial_delay_seconds(self) -> int:
        return self.initial_delay.to_seconds()

    @property
    def increment_seconds(self) -> int:
        return self.increment.to_seconds()

    @property
    def max_delay_seconds(self) -> int:
        return self.max_delay.to_seconds()


def _error_matcher(patterns: ErrorPatterns | None, types: ErrorTypes | None) -> Callable[[Exception], bool]:
    """Match on message (substring or ``re.search``) or type; no filter matches all."""
    if patterns is None and types is None:
        patterns = [_MATCH_ALL]
    patterns = patterns or []
    error_types = tuple(types or ())

    def matches(error: Exception) -> bool:
        if error_types and isinstance(error, error_types):
            return True
        text = safe_str(error)  # a user's broken __str__ must not break the retry decision
        return any(p.search(text) if isinstance(p, re.Pattern) else p in text for p in patterns)

    return matches


def _strategy(
    max_attempts: int,
    matches: Callable[[Exception], bool],
    base_delay: Callable[[int], float],
    jitter: JitterStrategy,
    rng: random.Random | None,
) -> RetryStrategy:
    def retry_strategy(error: Exception, attempts_made: int) -> RetryDecision:
        if attempts_made >= max_attempts or not matches(error):
            return RetryDecision.no_retry()
        return RetryDecision.retry(Duration(jitter.finalize_delay(base_delay(attempts_made), rng)))

    return retry_strategy


def create_retry_strategy(
    config: RetryStrategyConfig | None = None, *, rng: random.Random | None = None
) -> RetryStrategy:
    """Exponential-backoff strategy from ``config`` (defaults: 3 attempts, 5 s, x2)."""
    cfg = config or RetryStrategyConfig()

    def base_delay(attempts_made: int) -> float:
        return exponential_delay(cfg.initial_delay_seconds, cfg.backoff_rate, attempts_made, cfg.max_delay_seconds)

    matches = _error_matcher(cfg.retryable_errors, cfg.retryable_error_types)
    return _strategy(cfg.max_attempts, matches, base_delay, cfg.jitter_strategy, rng)


def create_linear_retry_strategy(
    config: LinearRetryStrategyConfig | None = None, *, rng: random.Random | None = None
) -> RetryStrategy:
    """Linear-backoff strategy from ``config`` (defaults: 6 attempts, 1 s + 1 s each)."""
    cfg = config or LinearRetryStrategyConfig()

    def base_delay(attempts_made: int) -> float:
        return min(cfg.initial_delay_seconds + cfg.increment_seconds * (attempts_made - 1), cfg.max_delay_seconds)

    matches = _error_matcher(cfg.retryable_errors, cfg.retryable_error_types)
    return _strategy(cfg.max_attempts, matches, base_delay, cfg.jitter_strategy, rng)


class RetryPresets:
    """Ready-made strategies; ``default()`` is what a step uses without a strategy."""

    @classmethod
    def none(cls) -> RetryStrategy:
        return create_retry_strategy(RetryStrategyConfig(max_attempts=1))

    @classmethod
    def default(cls) -> RetryStrategy:
        return create_retry_strategy(
            RetryStrategyConfig(
                max_attempts=6,
                initial_delay=Duration.from_seconds(5),
                max_delay=Duration.from_minutes(1),
                backoff_rate=2,
                jitter_strategy=JitterStrategy.FULL,
            )
        )

    @classmethod
    def transient(cls) -> RetryStrategy:
        return create_retry_strategy(
            RetryStrategyConfig(max_attempts=3, backoff_rate=2, jitter_strategy=JitterStrategy.HALF)
        )

    @classmethod
    def resource_availability(cls) -> RetryStrategy:
        return create_retry_strategy(
            RetryStrategyConfig(
                max_attempts=5,
                initial_delay=Duration.from_seconds(5),
                max_delay=Duration.from_minutes(5),
                backoff_rate=2,
            )
        )

    @classmethod
    def critical(cls) -> RetryStrategy:
        return create_retry_strategy(
            RetryStrategyConfig(
                max_attempts=10,
                initial_delay=Duration.from_seconds(1),
                max_delay=Duration.from_minutes(1),
                backoff_rate=1.5,
                jitter_strategy=JitterStrategy.NONE,
            )
        )

    @classmethod
    def linear(cls) -> RetryStrategy:
        """1 s, 2 s, 3 s, ... between 6 attempts, no jitter."""
        return create_linear_retry_strategy(
            LinearRetryStrategyConfig(max_attempts=6, jitter_strategy=JitterStrategy.NONE)
        )

    @classmethod
    def fixed(cls, interval: Duration | None = None) -> RetryStrategy:
        """The same delay (5 s by default) between 5 attempts, no jitter."""
        delay = interval if interval is not None else Duration.from_seconds(5)
        return create_retry_strategy(
            RetryStrategyConfig(
                max_attempts=5,
                initial_delay=delay,
                max_delay=delay,
                backoff_rate=1,
                jitter_strategy=JitterStrategy.NONE,
            )
        )


@dataclass(frozen=True)
class WithRetryConfig(Generic[T]):
    """Options of ``with_retry``: the strategy and whether to wrap in a child context."""

    retry_strategy: RetryStrategy | None = None
    wrap_with_run_in_child_context: bool = True
    child_context_config: ChildConfig[T] | None = None


class RetryContext(Protocol):
    """What ``with_retry`` calls on a ``DurableContext``."""

    def run_in_child_context(
        self, func: Callable[[Any], T], name: str | None = None, config: ChildConfig[Any] | None = None
    ) -> T: ...

    def wait(self, duration: Duration, name: str | None = None) -> None: ...


C = TypeVar("C", bound=RetryContext)


def with_retry(
    context: C,
    func: Callable[[C, int], T],
    config: WithRetryConfig[T],
    name: str | None = None,
) -> T:
    """Re-run a whole block of durable operations until it succeeds or the strategy gives up.

    Backoff is a durable ``ctx.wait`` named ``{name}-backoff-{attempt}``, so a resumed
    execution does not wait again for a backoff it already served.
    """
    strategy = config.retry_strategy or create_retry_strategy()

    def run_loop(ctx: C) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return func(ctx, attempt)
            except Exception as error:  # noqa: BLE001 - the strategy decides
                decision = strategy(error, attempt)
                if not decision.should_retry:
                    raise
                ctx.wait(decision.delay, name=f"{name}-backoff-{attempt}" if name else None)

    if config.wrap_with_run_in_child_context:
        return context.run_in_child_context(run_loop, name=name, config=config.child_context_config)
    return run_loop(context)
