"""A drop-in for the reference testing SDK: its names, re-exported from ``runner``.

Tests written for ``aws_durable_execution_sdk_python_testing`` port by changing the import::

    from durable_mp.testing import DurableFunctionTestRunner

    with DurableFunctionTestRunner(handler=handler) as runner:
        result = runner.run(input='{"order": 7}')
    assert result.status is InvocationStatus.SUCCEEDED

``durable_mp.testing.runner`` holds the runners and says where they differ from the reference's.
"""

from __future__ import annotations

from durable_mp.testing.runner import CallbackOperation as CallbackOperation
from durable_mp.testing.runner import ContextOperation as ContextOperation
from durable_mp.testing.runner import DurableChildContextTestRunner as DurableChildContextTestRunner
from durable_mp.testing.runner import DurableFunctionsTestError as DurableFunctionsTestError
from durable_mp.testing.runner import DurableFunctionTestResult as DurableFunctionTestResult
from durable_mp.testing.runner import DurableFunctionTestRunner as DurableFunctionTestRunner
from durable_mp.testing.runner import ExecutionOperation as ExecutionOperation
from durable_mp.testing.runner import ExecutionStatus as ExecutionStatus
from durable_mp.testing.runner import HistoryEvent as HistoryEvent
from durable_mp.testing.runner import HistoryResponse as HistoryResponse
from durable_mp.testing.runner import Operation as Operation
from durable_mp.testing.runner import StepOperation as StepOperation
from durable_mp.testing.runner import WaitOperation as WaitOperation

__all__ = [
    "CallbackOperation", "ContextOperation", "DurableChildContextTestRunner", "DurableFunctionTestResult",
    "DurableFunctionTestRunner", "DurableFunctionsTestError", "ExecutionOperation", "ExecutionStatus",
    "HistoryEvent", "HistoryResponse", "Operation", "StepOperation", "WaitOperation",
]
