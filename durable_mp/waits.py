"""Polling strategies for ``context.wait_for_condition``.

A wait strategy is ``(state, attempts_made) -> WaitForConditionDecision``.  A condition
that is met wins over exhausted attempts, so meeting it on the last poll still succeeds;
running out of attempts raises ``WaitForConditionError`` rather than returning the
partial state as if it were final.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from durable_mp.config import Duration
from durable_mp.core.serdes_base import SerDes
from durable_mp.exceptions import WaitForConditionError
from durable_mp.jitter import JitterStrategy, exponential_delay

__all__ = ["WaitForConditionConfig", "WaitForConditionDecision", "WaitStrategyConfig", "create_wait_strategy"]

T = TypeVar("T")
Numeric = int | float


@dataclass(frozen=True)
class WaitForConditionDecision:
    """Whether to poll again, and after how long."""

    should_continue: bool
    delay: Duration

    @property
    def delay_seconds(self) -> int:
        return self.delay.to_seconds()

    @classmethod
    def continue_waiting(cls, delay: Duration) -> WaitForConditionDecision:
        return cls(should_continue=True, delay=delay)

    @classmethod
    def stop_polling(cls) -> WaitForConditionDecision:
        return cls(should_continue=False, delay=Duration())


@dataclass
class WaitStrategyConfig(Generic[T]):
    """Exponential backoff between polls while ``should_continue_polling(state)``."""

    should_continue_polling: Callable[[T], bool]
    max_attempts: int = 60
    initial_delay: Duration = field(default_factory=lambda: Duration.from_seconds(5))
    max_delay: Duration = field(default_factory=lambda: Duration.from_minutes(5))
    backoff_rate: Numeric = 1.5
    jitter_strategy: JitterStrategy = JitterStrategy.FULL

    @property
    def initial_delay_seconds(self) -> int:
        return self.initial_delay.to_seconds()

    @property
    def max_delay_seconds(self) -> int:
        return self.max_delay.to_seconds()


def create_wait_strategy(
    config: WaitStrategyConfig[T], *, rng: random.Random | None = None
) -> Callable[[T, int], WaitForConditionDecision]:
    """Wait strategy from ``config``; ``rng`` makes the jitter deterministic in tests."""

    def wait_strategy(state: T, attempts_made: int) -> WaitForConditionDecision:
        if not config.should_continue_polling(state):
            return WaitForConditionDecision.stop_polling()
        if attempts_made >= config.max_attempts:
            raise WaitForConditionError(
                f"wait_for_condition exhausted {config.max_attempts} attempts before the condition was met"
            )
        base = exponential_delay(config.initial_delay_seconds, config.backoff_rate, attempts_made,
                                 config.max_delay_seconds)
        return WaitForConditionDecision.continue_waiting(Duration(config.jitter_strategy.finalize_delay(base, rng)))

    return wait_strategy


@dataclass(frozen=True)
class WaitForConditionConfig(Generic[T]):
    """What to poll with, from which initial state, serialized how."""

    wait_strategy: Callable[[T, int], WaitForConditionDecision]
    initial_state: T
    serdes: SerDes | None = None
