"""durable_mp: the AWS Durable Execution SDK's programming model on a local process pool.

Branches of ``context.parallel`` / ``context.map`` run in worker processes, every
operation is checkpointed in an embedded LMDB store, a dead worker costs only its
branch, and re-running a killed execution resumes from its checkpoints.

The packages, from the bottom up (docs/architecture.md draws the map): ``core`` holds
the records and the words every layer shares; ``store`` the LMDB store, written only by
the driver with group commit; ``engine`` where branches run: the driver's dispatcher
with its pure scheduling and fault decisions, the worker pool, the workers and the
messages between them; ``operation`` the durable operations, each opened through
``operation.replay``, the one place that says what the store already holds for an
operation; and ``context`` / ``execution`` the reference's API on top.  ``inspect``
reads executions through ``core`` and ``store`` only; ``backends.dask`` runs branches
on a Dask cluster; ``cli`` is the command line.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from durable_mp.concurrency.models import (
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
    from durable_mp.context import DurableContext, ParallelBranch
    from durable_mp.decorators import (
        durable_parallel_branch,
        durable_step,
        durable_wait_for_callback,
        durable_with_child_context,
    )
    from durable_mp.exceptions import (
        ChildContextError,
        DurableExecutionsError,
        DurableOperationError,
        ExecutionError,
        ExecutionFailedError,
        ExecutionLockedError,
        InvalidStateError,
        MemoryLimitExceededError,
        NonDeterministicExecutionError,
        SerDesError,
        StepError,
        StepInterruptedError,
        StepTimeoutError,
        StoreError,
        ValidationError,
        WaitForConditionError,
        WorkerCrashedError,
    )
    from durable_mp.execution import DurableFunction, durable_execution
    from durable_mp.lambda_service import ErrorObject, InvocationStatus
    from durable_mp.pmap import (
        file_content_key,
        file_key,
        map,  # noqa: A004 - durable_mp.map, as Executor.map
    )
    from durable_mp.retries import WithRetryConfig, with_retry
    from durable_mp.types import StepContext

# Each public name and the module it lives in.  They are imported on first use (PEP 562),
# so ``import durable_mp`` -- which a worker does before it runs a branch, and which every
# ``durable_mp.x`` submodule import implies -- costs almost nothing; a spawned worker or
# fork server imports only the modules it needs (engine.start.PRELOAD).
_HOMES: dict[str, tuple[str, ...]] = {
    "durable_mp.concurrency.models": ("BatchCompletionError", "BatchItem", "BatchItemStatus", "BatchResult",
                                      "CompletionDecision", "CompletionItemStatus", "CompletionOutcome",
                                      "CompletionReason", "CompletionStatus", "complete_batch", "continue_batch"),
    "durable_mp.context": ("DurableContext", "ParallelBranch"),
    "durable_mp.decorators": ("durable_parallel_branch", "durable_step", "durable_wait_for_callback",
                              "durable_with_child_context"),
    "durable_mp.exceptions": ("ChildContextError", "DurableExecutionsError", "DurableOperationError",
                              "ExecutionError", "ExecutionFailedError", "ExecutionLockedError", "InvalidStateError",
                              "MemoryLimitExceededError", "NonDeterministicExecutionError", "SerDesError",
                              "StepError", "StepInterruptedError", "StepTimeoutError", "StoreError",
                              "ValidationError", "WaitForConditionError", "WorkerCrashedError"),
    "durable_mp.execution": ("DurableFunction", "durable_execution"),
    "durable_mp.lambda_service": ("ErrorObject", "InvocationStatus"),
    "durable_mp.pmap": ("file_content_key", "file_key", "map"),
    "durable_mp.retries": ("WithRetryConfig", "with_retry"),
    "durable_mp.types": ("StepContext",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__version__ = "0.1.0"

__all__ = [
    "BatchCompletionError",
    "BatchItem",
    "BatchItemStatus",
    "BatchResult",
    "ChildContextError",
    "CompletionDecision",
    "CompletionItemStatus",
    "CompletionOutcome",
    "CompletionReason",
    "CompletionStatus",
    "DurableContext",
    "DurableExecutionsError",
    "DurableFunction",
    "DurableOperationError",
    "ErrorObject",
    "ExecutionError",
    "ExecutionFailedError",
    "ExecutionLockedError",
    "InvalidStateError",
    "InvocationStatus",
    "MemoryLimitExceededError",
    "NonDeterministicExecutionError",
    "ParallelBranch",
    "SerDesError",
    "StepContext",
    "StepError",
    "StepInterruptedError",
    "StepTimeoutError",
    "StoreError",
    "ValidationError",
    "WaitForConditionError",
    "WithRetryConfig",
    "WorkerCrashedError",
    "__version__",
    "complete_batch",
    "continue_batch",
    "durable_execution",
    "durable_parallel_branch",
    "durable_step",
    "durable_wait_for_callback",
    "durable_with_child_context",
    "map",
    "file_key",
    "file_content_key",
    "with_retry",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module the first time the name is asked for (PEP 562)."""
    module = _HOME_OF.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"durable_mp.{name}") is not None:
            # ``import durable_mp; durable_mp.config.StepConfig`` worked while this file imported
            # everything: a submodule asked for as an attribute is imported here
            return importlib.import_module(f"durable_mp.{name}")
        raise AttributeError(f"module 'durable_mp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME_OF))
