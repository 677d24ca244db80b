"""The vocabulary of batch completion: statuses, reasons and custom decisions.

It lives apart from ``concurrency.models`` because ``exceptions.BatchCompletionError``
needs ``CompletionReason`` and ``config.CompletionConfig`` names the predicate types,
while ``concurrency.rule`` and ``concurrency.models`` import both of those; this module imports only
``core.errors``, so it sits at the bottom of the import graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from durable_mp.core.errors import ValidationError


class BatchItemStatus(Enum):
    """State of one branch in a ``BatchResult`` (there is no separate batch status)."""

    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STARTED = "STARTED"


class CompletionReason(Enum):
    """Why a map/parallel stopped scheduling."""

    ALL_COMPLETED = "ALL_COMPLETED"
    MIN_SUCCESSFUL_REACHED = "MIN_SUCCESSFUL_REACHED"
    FAILURE_TOLERANCE_EXCEEDED = "FAILURE_TOLERANCE_EXCEEDED"
    CUSTOM_COMPLETION_SUCCEEDED = "CUSTOM_COMPLETION_SUCCEEDED"
    CUSTOM_COMPLETION_FAILED = "CUSTOM_COMPLETION_FAILED"


class CompletionOutcome(Enum):
    """Batch-level verdict of a custom ``should_complete`` decision."""

    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class CompletionDecision:
    """What a ``should_complete`` predicate returns; build it with the factories below."""

    complete: bool
    outcome: CompletionOutcome | None = None

    def __post_init__(self) -> None:
        if self.complete and self.outcome is None:
            raise ValidationError("CompletionDecision: outcome is required when complete is True")
        if not self.complete and self.outcome is not None:
            raise ValidationError("CompletionDecision: outcome must be None when complete is False")


def continue_batch() -> CompletionDecision:
    """Keep scheduling: the predicate does not want to stop yet."""
    return CompletionDecision(complete=False)


def complete_batch(outcome: CompletionOutcome = CompletionOutcome.SUCCEEDED) -> CompletionDecision:
    """Stop now, declaring the batch a success (default) or a failure."""
    return CompletionDecision(complete=True, outcome=outcome)


@dataclass(frozen=True)
class CompletionItemStatus:
    """One branch as a predicate sees it; ``status=None`` means not scheduled yet."""

    index: int
    name: str | None = None
    status: BatchItemStatus | None = None


@dataclass(frozen=True)
class CompletionStatus:
    """Progress snapshot handed to ``should_complete``; ``items[i]`` is branch ``i``."""

    success_count: int
    failure_count: int
    completed_count: int
    total_count: int
    items: tuple[CompletionItemStatus, ...] = ()

