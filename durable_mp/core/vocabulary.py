"""The words durable_mp writes into records and shares between processes, spelled once.

Sub-types and statuses are plain strings, not enums: they are stored in every record, and
a stored string must not depend on a class that might move.  ``lambda_service`` wraps the
sub-types in the reference's ``OperationSubType`` enum for user code.
"""

from __future__ import annotations

PICKLE_PROTOCOL = 5  # out-of-band buffers (numpy zero-copy); every Python we support reads it

# How often a driver or worker that waits on a callback re-reads the store.
CALLBACK_POLL_SECONDS = 0.1


class SubType:
    """Operation sub-types (values match the reference's ``OperationSubType``)."""

    STEP = "Step"
    WAIT = "Wait"
    CALLBACK = "Callback"
    RUN_IN_CHILD_CONTEXT = "RunInChildContext"
    MAP = "Map"
    MAP_ITERATION = "MapIteration"
    PARALLEL = "Parallel"
    PARALLEL_BRANCH = "ParallelBranch"
    WAIT_FOR_CALLBACK = "WaitForCallback"
    WAIT_FOR_CONDITION = "WaitForCondition"
    CHAINED_INVOKE = "ChainedInvoke"


BATCH_SUB_TYPES = frozenset({SubType.PARALLEL, SubType.MAP})
BRANCH_SUB_TYPES = frozenset({SubType.PARALLEL_BRANCH, SubType.MAP_ITERATION})


class ExecutionStatus:
    """Statuses of an execution record (a run in progress or interrupted is RUNNING)."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


RUNNING, SUCCEEDED, FAILED = ExecutionStatus.RUNNING, ExecutionStatus.SUCCEEDED, ExecutionStatus.FAILED


def map_item_name(index: int) -> str:
    """Name of map item ``index`` when the caller gave none (the reference's default)."""
    return f"map-item-{index}"


def parallel_branch_name(index: int) -> str:
    """Name of parallel branch ``index`` when the caller gave none (the reference's default)."""
    return f"parallel-branch-{index}"


def default_item_name(index: int, *, parallel: bool) -> str:
    return parallel_branch_name(index) if parallel else map_item_name(index)
