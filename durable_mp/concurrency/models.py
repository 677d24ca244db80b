"""Reference-compatible module path for the batch models; they live in ``durable_mp.batch``."""

from durable_mp.batch import (
    BatchCompletionError,
    BatchItem,
    BatchItemStatus,
    BatchResult,
    CompletionDecision,
    CompletionItemStatus,
    CompletionOutcome,
    CompletionReason,
    CompletionStatus,
    complete_batch,
    continue_batch,
)

__all__ = ["BatchCompletionError", "BatchItem", "BatchItemStatus", "BatchResult", "CompletionDecision",
           "CompletionItemStatus", "CompletionOutcome", "CompletionReason", "CompletionStatus", "complete_batch",
           "continue_batch"]
