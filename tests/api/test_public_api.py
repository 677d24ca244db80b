"""The public surface: the reference SDK's names in the reference's modules, pinned."""

from __future__ import annotations

import importlib
import inspect

import pytest

pytestmark = pytest.mark.process_free  # no test here starts a process

SURFACE = {
    # exactly durable_mp.__all__: the reference's top level, then durable_mp's own names
    "durable_mp": [
        "durable_execution", "DurableContext", "StepContext", "BatchResult", "BatchItem", "BatchItemStatus",
        "CompletionReason", "durable_step", "durable_with_child_context", "durable_parallel_branch",
        "durable_wait_for_callback", "ParallelBranch", "ErrorObject", "BatchCompletionError",
        "CompletionDecision", "CompletionItemStatus", "CompletionOutcome", "CompletionStatus", "complete_batch",
        "continue_batch", "WithRetryConfig", "with_retry", "InvocationStatus", "StepError", "ChildContextError",
        "DurableExecutionsError", "DurableOperationError", "ExecutionError", "InvalidStateError",
        "StepInterruptedError", "WaitForConditionError", "ValidationError", "SerDesError",
        "NonDeterministicExecutionError", "__version__",
        "DurableFunction", "ExecutionFailedError", "WorkerCrashedError", "StepTimeoutError",
        "MemoryLimitExceededError", "ExecutionLockedError", "StoreError", "map", "file_key", "file_content_key",
    ],
    "durable_mp.config": [
        "ParallelConfig", "MapConfig", "CompletionConfig", "StepConfig", "StepSemantics", "ChildConfig",
        "Duration", "JitterStrategy", "NestingType", "CallbackConfig", "WaitForCallbackConfig",
    ],
    "durable_mp.retries": [
        "RetryStrategyConfig", "LinearRetryStrategyConfig", "RetryDecision", "RetryPresets",
        "create_retry_strategy", "create_linear_retry_strategy", "JitterStrategy",
    ],
    "durable_mp.serdes": ["SerDes", "SerDesContext", "JsonSerDes", "PickleSerDes", "ExtendedTypeSerDes",
                          "PassThroughSerDes"],
    "durable_mp.exceptions": [
        "DurableExecutionsError", "StepError", "ChildContextError", "SerDesError",
        "NonDeterministicExecutionError", "ValidationError", "ExecutionFailedError", "WorkerCrashedError",
        "StepTimeoutError", "MemoryLimitExceededError", "ExecutionLockedError", "StoreError",
        "DurableOperationError", "InvalidStateError", "ExecutionError", "StepInterruptedError",
    ],
    "durable_mp.waits": ["WaitForConditionConfig", "WaitStrategyConfig", "create_wait_strategy",
                         "WaitForConditionDecision"],
    "durable_mp.types": ["StepContext", "WaitForConditionCheckContext", "WaitForCallbackContext"],
    "durable_mp.lambda_service": ["ErrorObject", "OperationType", "OperationSubType", "OperationStatus",
                                  "InvocationStatus"],
}


@pytest.mark.parametrize("module", sorted(SURFACE))
def test_public_names_exist(module):
    mod = importlib.import_module(module)
    missing = [name for name in SURFACE[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lacks {missing}"


def test_top_level_all_is_exactly_the_pinned_surface():
    import durable_mp

    exported = list(durable_mp.__all__)
    assert len(exported) == len(set(exported)), "a name is listed twice in __all__"
    assert len(SURFACE["durable_mp"]) == len(set(SURFACE["durable_mp"]))
    assert sorted(exported) == sorted(SURFACE["durable_mp"]), (
        f"added: {sorted(set(exported) - set(SURFACE['durable_mp']))}, "
        f"removed: {sorted(set(SURFACE['durable_mp']) - set(exported))}")
    for name in exported:
        assert hasattr(durable_mp, name), name


def test_context_methods_have_the_reference_signatures():
    from durable_mp import DurableContext

    sig = lambda name: list(inspect.signature(getattr(DurableContext, name)).parameters)  # noqa: E731
    assert sig("step") == ["self", "func", "name", "config"]
    assert sig("parallel") == ["self", "functions", "name", "config"]
    assert sig("map") == ["self", "inputs", "func", "name", "config"]
    assert sig("run_in_child_context") == ["self", "func", "name", "config"]
    assert sig("wait") == ["self", "duration", "name"]
    assert sig("wait_for_condition") == ["self", "check", "config", "name"]
    assert callable(DurableContext.is_replaying)


def test_batch_result_has_the_documented_but_never_shipped_fields():
    from durable_mp import BatchItem, BatchItemStatus, BatchResult, CompletionReason

    r = BatchResult([BatchItem(0, BatchItemStatus.SUCCEEDED, "a"), BatchItem(1, BatchItemStatus.FAILED)],
                    CompletionReason.ALL_COMPLETED)
    assert r.successful_results == ["a"]
    assert [it.index for it in r.failed_results] == [1]


def test_package_is_typed():
    import os

    import durable_mp

    assert os.path.exists(os.path.join(os.path.dirname(durable_mp.__file__), "py.typed"))
