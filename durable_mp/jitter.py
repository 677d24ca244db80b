"""Backoff and jitter for retry and polling delays, with an injectable random source.

Kept in its own module because ``config`` (which exposes ``JitterStrategy`` as the
reference does) and ``retries``/``waits`` (which use it) import each other's names.
Tests pass a seeded ``random.Random``, or reseed ``RANDOM``, for deterministic delays.
"""

from __future__ import annotations

import math
import random

from durable_mp._compat import StrEnum

MIN_DELAY_SECONDS = 1  # the service cannot schedule anything sooner

RANDOM = random.Random()  # default source of jitter; replace or reseed in tests


def exponential_delay(initial: float, rate: float, attempts_made: int, cap: float) -> float:
    """``initial * rate ** (attempts_made - 1)``, at most ``cap``: the delay before the next try."""
    return min(initial * rate ** (attempts_made - 1), cap)


class JitterStrategy(StrEnum):
    """How much randomness to add to a delay, to keep retries from stampeding."""

    NONE = "NONE"  # exactly the computed delay
    FULL = "FULL"  # uniform in [0, delay]
    HALF = "HALF"  # uniform in [delay/2, delay]

    def apply_jitter(self, delay: float, rng: random.Random | None = None) -> float:
        """``delay`` with this strategy's randomness applied (still fractional)."""
        source = rng or RANDOM
        if self is JitterStrategy.NONE:
            return delay
        if self is JitterStrategy.HALF:
            return delay / 2 + source.random() * (delay / 2)
        return source.random() * delay

    def finalize_delay(self, base_delay: float, rng: random.Random | None = None) -> int:
        """Jittered delay rounded up to whole seconds and clamped to at least 1 s."""
        return max(MIN_DELAY_SECONDS, math.ceil(self.apply_jitter(base_delay, rng)))
