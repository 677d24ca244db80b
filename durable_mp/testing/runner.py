"""``durable_mp.testing.runner``: where the reference testing SDK keeps its runners.

Code written for ``aws_durable_execution_sdk_python_testing.runner`` ports by a mechanical
rename of the package.  The local runner is ``durable_mp.testing``'s; there is no cloud:
``DurableFunctionCloudTestRunner`` exists so that imports and ``isinstance`` checks work,
and refuses to be constructed.
"""

from __future__ import annotations

from typing import Any

from durable_mp.testing import (
    CallbackOperation,
    ContextOperation,
    DurableChildContextTestRunner,
    DurableFunctionsTestError,
    DurableFunctionTestResult,
    DurableFunctionTestRunner,
    ExecutionOperation,
    ExecutionStatus,
    HistoryEvent,
    HistoryResponse,
    Operation,
    StepOperation,
    WaitOperation,
)

__all__ = [
    "CallbackOperation", "ContextOperation", "DurableChildContextTestRunner", "DurableFunctionCloudTestRunner",
    "DurableFunctionTestResult", "DurableFunctionTestRunner", "DurableFunctionsTestError", "ExecutionOperation",
    "ExecutionStatus", "HistoryEvent", "HistoryResponse", "Operation", "StepOperation", "WaitOperation",
]


class DurableFunctionCloudTestRunner:
    """The reference's runner for deployed Lambda functions; durable_mp runs locally only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("durable_mp has no cloud: use DurableFunctionTestRunner (local processes)")
