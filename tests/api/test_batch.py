"""BatchResult/BatchItem, ErrorObject and the exception hierarchy."""

from __future__ import annotations

import pickle

import pytest

from durable_mp import exceptions as exc
from durable_mp.concurrency.models import (
    BatchCompletionError,
    BatchItem,
    BatchItemStatus,
    BatchResult,
    CompletionReason,
)
from durable_mp.config import CompletionConfig
from durable_mp.lambda_service import (
    ErrorObject,
    InvocationStatus,
    OperationStatus,
    OperationSubType,
    OperationType,
)
from durable_mp.core.records import OpStatus, OpType

pytestmark = pytest.mark.process_free  # no test here starts a process

S, F, R = BatchItemStatus.SUCCEEDED, BatchItemStatus.FAILED, BatchItemStatus.STARTED


def err(message: str, type_: str = "ValueError") -> ErrorObject:
    return ErrorObject(message=message, type=type_, data=None, stack_trace=None)


def mixed() -> BatchResult:
    return BatchResult(
        [
            BatchItem(0, S, {"v": 0}),
            BatchItem(1, F, None, err("one")),
            BatchItem(2, R),
            BatchItem(3, S, None),  # a branch may legitimately return None
            BatchItem(4, F, None, err("four", "KeyError")),
        ],
        CompletionReason.ALL_COMPLETED,
    )


# --- BatchResult ------------------------------------------------------------------------


def test_counts_and_selections():
    r = mixed()
    assert (r.success_count, r.failure_count, r.started_count, r.total_count) == (2, 2, 1, 5)
    assert [i.index for i in r.succeeded()] == [0, 3]
    assert [i.index for i in r.failed()] == [1, 4]
    assert [i.index for i in r.started()] == [2]
    assert r.get_results() == [{"v": 0}, None]
    assert [e.message for e in r.get_errors()] == ["one", "four"]
    assert r.has_failure


def test_successful_and_failed_results_properties():
    r = mixed()
    assert r.successful_results == [{"v": 0}, None]
    assert [(i.index, i.error.type) for i in r.failed_results] == [(1, "ValueError"), (4, "KeyError")]
    assert all(isinstance(i, BatchItem) for i in r.failed_results)


def test_items_are_kept_in_input_order():
    r = BatchResult([BatchItem(2, S, "c"), BatchItem(0, S, "a"), BatchItem(1, F, None, err("b"))], "ALL_COMPLETED")
    assert [i.index for i in r.all] == [0, 1, 2]
    assert r.get_results() == ["a", "c"]
    assert r.completion_reason is CompletionReason.ALL_COMPLETED


@pytest.mark.parametrize(
    ("statuses", "reason", "expected"),
    [
        ([S, S], CompletionReason.ALL_COMPLETED, S),
        ([S, F], CompletionReason.ALL_COMPLETED, F),  # tolerated failures still make it FAILED
        ([S, F], CompletionReason.FAILURE_TOLERANCE_EXCEEDED, F),
        ([R, S, R], CompletionReason.MIN_SUCCESSFUL_REACHED, S),
        ([S, S], CompletionReason.CUSTOM_COMPLETION_FAILED, F),
        ([S, F], CompletionReason.CUSTOM_COMPLETION_SUCCEEDED, S),
        ([], CompletionReason.ALL_COMPLETED, S),
    ],
)
def test_status_rules(statuses, reason, expected):
    items = [BatchItem(i, st, None, err("x") if st is F else None) for i, st in enumerate(statuses)]
    assert BatchResult(items, reason).status is expected


def test_throw_if_error_raises_for_lowest_failed_index():
    r = BatchResult(
        [BatchItem(3, F, None, err("three")), BatchItem(1, F, None, err("boom in branch body", "ValueError"))],
        CompletionReason.CUSTOM_COMPLETION_FAILED,
    )
    with pytest.raises(exc.ChildContextError) as info:
        r.throw_if_error()
    assert info.value.message == "boom in branch body"
    assert info.value.error_type == "ValueError"
    assert type(info.value.__cause__) is exc.DurableOperationError
    assert info.value.__cause__.message == "boom in branch body"


def test_throw_if_error_rebuilds_typed_cause_and_keeps_fields():
    e = ErrorObject("always", "durable_mp.exceptions.StepError", "payload", ["line 1\n"])
    with pytest.raises(exc.ChildContextError) as info:
        BatchResult([BatchItem(0, F, None, e)], CompletionReason.FAILURE_TOLERANCE_EXCEEDED).throw_if_error()
    assert (info.value.data, info.value.stack_trace) == ("payload", ["line 1\n"])
    assert type(info.value.__cause__) is exc.StepError


def test_throw_if_error_keeps_serdes_failures_as_serdes_errors():
    e = ErrorObject.from_exception(exc.SerDesError("cannot pickle"))
    with pytest.raises(exc.SerDesError, match="cannot pickle"):
        BatchResult([BatchItem(0, F, None, e)], CompletionReason.ALL_COMPLETED).throw_if_error()


def test_throw_if_error_without_error_object():
    with pytest.raises(exc.ChildContextError, match="Batch item 2 failed without an ErrorObject."):
        BatchResult([BatchItem(2, F)], CompletionReason.ALL_COMPLETED).throw_if_error()


def test_throw_if_error_custom_failure_without_failed_items():
    r = BatchResult([BatchItem(0, S, 1)], CompletionReason.CUSTOM_COMPLETION_FAILED)
    with pytest.raises(BatchCompletionError) as info:
        r.throw_if_error()
    assert info.value.completion_reason is CompletionReason.CUSTOM_COMPLETION_FAILED
    assert "CUSTOM_COMPLETION_FAILED" in str(info.value)


def test_throw_if_error_is_silent_without_failures():
    BatchResult([BatchItem(0, S, 1), BatchItem(1, R)], CompletionReason.MIN_SUCCESSFUL_REACHED).throw_if_error()


def test_dict_round_trip_matches_reference_shape():
    r = mixed()
    d = r.to_dict()
    assert d["completionReason"] == "ALL_COMPLETED"
    assert d["all"][1] == {"index": 1, "status": "FAILED", "result": None,
                           "error": {"ErrorMessage": "one", "ErrorType": "ValueError"}}
    assert d["all"][0] == {"index": 0, "status": "SUCCEEDED", "result": {"v": 0}, "error": None}
    back = BatchResult.from_dict(d)
    assert back == r


def test_from_dict_without_reason_infers_it_from_items_and_config():
    d = {"all": [BatchItem(0, S, 1).to_dict(), BatchItem(1, F, None, err("x")).to_dict()]}
    assert BatchResult.from_dict(d).completion_reason is CompletionReason.FAILURE_TOLERANCE_EXCEEDED
    tolerant = CompletionConfig.all_completed()
    assert BatchResult.from_dict(d, tolerant).completion_reason is CompletionReason.ALL_COMPLETED


@pytest.mark.parametrize(
    ("statuses", "config", "reason"),
    [
        ([S, S], None, CompletionReason.ALL_COMPLETED),
        ([S, F], CompletionConfig.all_successful(), CompletionReason.FAILURE_TOLERANCE_EXCEEDED),
        ([R, S, R], CompletionConfig.first_successful(), CompletionReason.MIN_SUCCESSFUL_REACHED),
        ([R, R], CompletionConfig(min_successful=3), CompletionReason.ALL_COMPLETED),  # no min check on inference
        ([F, F], CompletionConfig.first_successful(), CompletionReason.ALL_COMPLETED),
    ],
)
def test_from_items(statuses, config, reason):
    items = [BatchItem(i, st, None, err("x") if st is F else None) for i, st in enumerate(statuses)]
    assert BatchResult.from_items(items, config).completion_reason is reason


def test_pickles():
    r = mixed()
    assert pickle.loads(pickle.dumps(r, protocol=5)) == r


# --- ErrorObject ------------------------------------------------------------------------


class Outer:
    class CustomError(Exception):
        pass


def _raise(error: Exception) -> Exception:
    try:
        raise error
    except Exception as caught:  # noqa: BLE001
        return caught


def test_error_object_dict_omits_none_fields():
    e = ErrorObject("m", "T", None, None)
    assert e.to_dict() == {"ErrorMessage": "m", "ErrorType": "T"}
    full = ErrorObject("m", "T", "d", ["a", "b"])
    assert full.to_dict() == {"ErrorMessage": "m", "ErrorType": "T", "ErrorData": "d", "StackTrace": ["a", "b"]}
    assert ErrorObject.from_dict(full.to_dict()) == full
    assert ErrorObject.from_dict({}) == ErrorObject(None, None, None, None)


def test_from_exception_names_builtins_plainly_and_others_qualified():
    assert ErrorObject.from_exception(ValueError("bad")).type == "ValueError"
    custom = ErrorObject.from_exception(Outer.CustomError("c"))
    assert custom.type == f"{__name__}.Outer.CustomError"
    assert custom.message == "c"


def test_from_exception_keeps_the_formatted_traceback_of_plain_errors():
    e = ErrorObject.from_exception(_raise(KeyError("missing")))
    assert e.message == "'missing'" and e.data is None
    text = "".join(e.stack_trace)
    assert "Traceback (most recent call last)" in text and "in _raise" in text and "KeyError: 'missing'" in text


def test_from_exception_copies_operation_error_fields():
    step = exc.StepError("always", "ConnectionError", "d", ["origin\n"])
    e = ErrorObject.from_exception(step)
    assert e == ErrorObject("always", "durable_mp.exceptions.StepError", "d", ["origin\n"])
    serdes = ErrorObject.from_exception(exc.SerDesError("nope"))
    assert serdes.type == "durable_mp.exceptions.SerDesError" and serdes.stack_trace is None


def test_to_exception_rebuilds_registered_types_only():
    typed = ErrorObject("t", "durable_mp.exceptions.WorkerCrashedError", None, None).to_exception()
    assert type(typed) is exc.WorkerCrashedError and typed.message == "t"
    plain = ErrorObject("v", "ValueError", "d", None).to_exception()
    assert type(plain) is exc.DurableOperationError
    assert (plain.error_type, plain.data) == ("ValueError", "d")


def test_enum_values_match_the_record_strings():
    for name in ("EXECUTION", "CONTEXT", "STEP", "WAIT", "CALLBACK"):
        assert OperationType[name].value == getattr(OpType, name)
    for name in ("STARTED", "PENDING", "SUCCEEDED", "FAILED"):
        assert OperationStatus[name].value == getattr(OpStatus, name)
    assert OperationSubType.MAP_ITERATION == "MapIteration"
    assert OperationSubType.PARALLEL_BRANCH == "ParallelBranch"
    assert [s.value for s in InvocationStatus] == ["SUCCEEDED", "FAILED", "PENDING", "RETRY"]


# --- exceptions -------------------------------------------------------------------------


def test_hierarchy():
    assert issubclass(exc.BatchCompletionError, exc.DurableOperationError)
    for cls in (exc.StepError, exc.ChildContextError, exc.WorkerCrashedError, exc.StepTimeoutError,
                exc.MemoryLimitExceededError, exc.CallbackTimeoutError):
        assert issubclass(cls, exc.DurableOperationError)
    for cls in (exc.SerDesError, exc.ValidationError, exc.ExecutionFailedError, exc.ExecutionLockedError,
                exc.StoreError, exc.UnrecoverableError):
        assert issubclass(cls, exc.DurableExecutionsError)
    assert issubclass(exc.NonDeterministicExecutionError, exc.ExecutionError)
    assert issubclass(exc.StepInterruptedError, exc.InvocationError)
    assert not issubclass(exc.OrphanedChildException, Exception)


def test_operation_error_defaults_its_type_to_its_own_name():
    assert exc.StepError("m").error_type == "durable_mp.exceptions.StepError"
    assert exc.StepError("m", "KeyError").error_type == "KeyError"
    nd = exc.NonDeterministicExecutionError("moved", step_id="abc")
    assert nd.termination_reason is exc.TerminationReason.NON_DETERMINISTIC_EXECUTION and nd.step_id == "abc"


def test_execution_failed_error_shows_type_and_message():
    failed = exc.ExecutionFailedError(ErrorObject("handler failed", "ValueError", None, None))
    assert str(failed) == "ValueError: handler failed"
    assert failed.error.message == "handler failed"
    assert str(exc.ExecutionFailedError(ErrorObject(None, None, None, None))) == "Error"


@pytest.mark.parametrize(
    "error",
    [
        exc.StepError("m", "KeyError", "d", ["t"]),
        BatchCompletionError(CompletionReason.CUSTOM_COMPLETION_FAILED),
        exc.NonDeterministicExecutionError("x", step_id="s"),
        exc.UnrecoverableError("u", exc.TerminationReason.UNHANDLED_ERROR),
        exc.StepInterruptedError("i", "s"),
        exc.ExecutionFailedError(ErrorObject("m", "T", None, None)),
        exc.OrphanedChildException("orphan", "op-1"),
        exc.SerDesError("s"),
    ],
)
def test_exceptions_survive_pickling(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert vars(back) == vars(error)
