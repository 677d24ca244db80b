"""The completion rule of a batch: pure predicates over counts, frozen once the batch starts.

The reference SDK's ``CompletionPolicy`` is a frozen dataclass that is the one home of
completion logic; this is ours.  It knows the configuration and the batch's size and
answers from counts alone (successes, failures), so it is tested against a truth table
and the reference without any scheduler.  The mutable per-batch tracker that feeds it
counts (``concurrency.policy.CompletionPolicy``) lives apart.  Rules, as in the
reference SDK:

* tolerance is exceeded when ``failed > tolerated_failure_count`` or
  ``failed / total * 100 > tolerated_failure_percentage``; with no criteria at all a
  single failure exceeds it (fail-fast); with a ``should_complete`` predicate it never is;
* the batch is complete when the predicate says so, when every item finished, or when
  ``min_successful`` successes are in;
* reason precedence: FAILURE_TOLERANCE_EXCEEDED, CUSTOM_COMPLETION_*, ALL_COMPLETED,
  MIN_SUCCESSFUL_REACHED.
"""

from __future__ import annotations

from dataclasses import dataclass

from durable_mp.config import CompletionConfig
from durable_mp.core.completion import CompletionDecision, CompletionOutcome, CompletionReason
from durable_mp.exceptions import ValidationError


def percentage_limit(pct: float, total: int) -> int:
    """The fewest failures ``tolerance_exceeded`` calls over ``pct`` percent of ``total``.

    That test is the reference's float comparison ``failed / total * 100 > pct``; the
    real-number answer ``int(pct * total / 100) + 1`` is one too many where the float
    product rounds up past an integer (20 items at 55 %: 11 failures exceed it), which
    let a worker start one item after the batch was decided.  Start from it and step to
    the comparison's own boundary (at most a step or two).
    """
    limit = int(pct * total / 100) + 1
    while limit > 0 and (limit - 1) / total * 100 > pct:
        limit -= 1
    while limit <= total and not limit / total * 100 > pct:
        limit += 1
    return limit


@dataclass(frozen=True)
class CompletionRule:
    """When a batch of ``total`` items is done, from its counts; build it with ``of``."""

    total: int
    min_successful: int | None = None
    max_failures: int | None = None  # tolerated_failure_count
    max_failure_pct: float | None = None  # tolerated_failure_percentage
    custom: bool = False  # a should_complete predicate decides (it may decide on any outcome)

    @classmethod
    def of(cls, config: CompletionConfig | None, total: int, *, validate_total: bool = True) -> CompletionRule:
        config = config if config is not None else CompletionConfig()
        if total < 0:
            raise ValidationError(f"total must be non-negative, got: {total}")
        if validate_total and config.min_successful is not None and config.min_successful > total:
            raise ValidationError(
                f"min_successful cannot be greater than total items: {config.min_successful} > {total}"
            )
        return cls(total, config.min_successful, config.tolerated_failure_count,
                   config.tolerated_failure_percentage, config.should_complete is not None)

    @property
    def fail_fast(self) -> bool:
        """No criteria at all: the first failure ends the batch."""
        return not self.custom and self.max_failures is None and self.max_failure_pct is None \
            and self.min_successful is None

    def tolerance_exceeded(self, failed: int) -> bool:
        """True when ``failed`` failures are more than the config tolerates."""
        if self.custom:
            return False
        if self.fail_fast:
            return failed > 0
        if self.max_failures is not None and failed > self.max_failures:
            return True
        if self.max_failure_pct is not None and self.total > 0:
            return failed / self.total * 100 > self.max_failure_pct
        return False

    def min_successful_reached(self, succeeded: int) -> bool:
        return self.min_successful is not None and succeeded >= self.min_successful

    def reason(self, succeeded: int, failed: int, custom: CompletionDecision | None = None) -> CompletionReason | None:
        """None to keep scheduling; otherwise the reason to stop.  ``custom``: the predicate's answer, if any."""
        if self.tolerance_exceeded(failed):
            return CompletionReason.FAILURE_TOLERANCE_EXCEEDED
        if custom is not None and custom.complete:
            if custom.outcome is CompletionOutcome.FAILED:
                return CompletionReason.CUSTOM_COMPLETION_FAILED
            return CompletionReason.CUSTOM_COMPLETION_SUCCEEDED
        if succeeded + failed >= self.total:
            return CompletionReason.ALL_COMPLETED
        if self.min_successful_reached(succeeded):
            return CompletionReason.MIN_SUCCESSFUL_REACHED
        return None

    def stop_distance(self, succeeded: int, failed: int) -> tuple[int | None, int | None]:
        """(more failures, more successes) that would complete the batch; None = no number would.

        A ``should_complete`` predicate may decide on any outcome: (1, 1).  Reaching
        ALL_COMPLETED is not counted: it needs every item, so no item is started after it.
        This is also each chunk's start budget (``scheduling.start_budget``).
        """
        if self.custom:
            return 1, 1
        failures: int | None = None
        if self.fail_fast:
            failures = 1
        else:
            limits = []
            if self.max_failures is not None:
                limits.append(self.max_failures + 1)
            if self.max_failure_pct is not None and self.total > 0:
                limits.append(percentage_limit(self.max_failure_pct, self.total))
            if limits:
                failures = max(1, min(limits) - failed)
                if failures + failed > self.total:
                    failures = None
        successes = None
        if self.min_successful is not None:
            successes = max(1, self.min_successful - succeeded)
        return failures, successes
