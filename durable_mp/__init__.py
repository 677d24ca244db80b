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
