"""The exception hierarchy: the reference SDK's tree plus durable_mp's own failures.

Two families matter to callers.  ``DurableOperationError`` subclasses describe one
operation that failed for good (a step, a branch); they carry the escaping error's
``error_type``/``message``/``data``/``stack_trace`` so they can be rebuilt from a
checkpoint identically on the first run and on replay.  ``UnrecoverableError``
subclasses end the whole execution.  durable_mp's additions (worker crash, timeout,
memory limit) are operation errors, so a retry strategy can decide about them.

This module imports only ``core``.  The root classes (``DurableExecutionsError``,
``ValidationError``, ``InvalidStateError``) are defined in ``core.errors`` so that
``core`` can raise them; they are re-exported here, their public home.
"""

from __future__ import annotations

from enum import Enum

from durable_mp.core.completion import CompletionReason
from durable_mp.core.errors import DurableExecutionsError, ErrorDetails, PickleByState
from durable_mp.core.errors import InvalidStateError as InvalidStateError  # re-export
from durable_mp.core.errors import ValidationError as ValidationError  # re-export
from durable_mp.core.remote import RemoteTraceback as RemoteTraceback  # re-export: its public home
from durable_mp.core.remote import origin_note, remote_traceback


class TerminationReason(Enum):
    """Why a durable execution terminated."""

    UNHANDLED_ERROR = "UNHANDLED_ERROR"
    INVOCATION_ERROR = "INVOCATION_ERROR"
    EXECUTION_ERROR = "EXECUTION_ERROR"
    CHECKPOINT_FAILED = "CHECKPOINT_FAILED"
    NON_DETERMINISTIC_EXECUTION = "NON_DETERMINISTIC_EXECUTION"
    STEP_INTERRUPTED = "STEP_INTERRUPTED"
    SERIALIZATION_ERROR = "SERIALIZATION_ERROR"


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _ErrorFields(DurableExecutionsError):
    """The four checkpointed fields shared by operation and serdes errors."""

    def __init__(
        self,
        message: str | None = None,
        error_type: str | None = None,
        data: str | None = None,
        stack_trace: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message: str | None = message
        # Without an escaping error the wrapper names itself, as in the reference.
        self.error_type: str = error_type or _qualified_name(type(self))
        self.data: str | None = data
        self.stack_trace: list[str] | None = stack_trace


class SerDesError(_ErrorFields):
    """A value could not be (de)serialized; permanent, so a step fails without retry."""


class DurableOperationError(_ErrorFields):
    """A durable operation failed; ``error_type`` names the error that escaped it."""

    @classmethod
    def from_error_fields(
        cls,
        error_type: str | None,
        message: str | None,
        data: str | None,
        stack_trace: list[str] | None,
    ) -> DurableOperationError:
        """Rebuild the registered subclass named by ``error_type`` (else the base)."""
        target = _OPERATION_ERRORS.get(error_type or "", DurableOperationError)
        return target(message=message, error_type=error_type, data=data, stack_trace=stack_trace)


class StepError(DurableOperationError):
    """A step failed after its retry strategy gave up."""


class InvokeError(DurableOperationError):
    """A chained invoke failed."""


class ChildContextError(DurableOperationError):
    """A child context, parallel branch or map item failed."""


class WaitForConditionError(DurableOperationError):
    """A wait_for_condition failed or ran out of attempts."""


class CallbackError(DurableOperationError):
    """Base of callback failures."""


class CallbackExternalError(CallbackError):
    """The external system reported the callback as failed."""


class CallbackTimeoutError(CallbackError):
    """The callback (or its heartbeat) timed out."""


class CallbackSubmitterError(CallbackError):
    """The submitter step of wait_for_callback failed."""


class BatchCompletionError(DurableOperationError):
    """``throw_if_error()`` on a batch a custom ``should_complete`` declared failed."""

    def __init__(
        self,
        completion_reason: CompletionReason = CompletionReason.CUSTOM_COMPLETION_FAILED,
        message: str | None = None,
        error_type: str | None = None,
        data: str | None = None,
        stack_trace: list[str] | None = None,
    ) -> None:
        default = f"Batch completed as failed by should_complete ({completion_reason.value})"
        super().__init__(message or default, error_type, data, stack_trace)
        self.completion_reason: CompletionReason = completion_reason


class WorkerCrashedError(DurableOperationError):
    """The worker process running a branch died (signal, ``os._exit``, OOM killer)."""


class StepTimeoutError(DurableOperationError):
    """A step or branch ran past its ``timeout``; the driver terminated its worker."""


class MemoryLimitExceededError(DurableOperationError):
    """A worker's resident memory passed its limit; the driver terminated it."""


class UnrecoverableError(DurableExecutionsError):
    """Base of errors that end the execution instead of one operation."""

    def __init__(self, message: str, termination_reason: TerminationReason) -> None:
        super().__init__(message)
        self.termination_reason = termination_reason


class ExecutionError(UnrecoverableError):
    """The execution fails without retry."""

    def __init__(
        self, message: str, termination_reason: TerminationReason = TerminationReason.EXECUTION_ERROR
    ) -> None:
        super().__init__(message, termination_reason)


class NonDeterministicExecutionError(ExecutionError):
    """Replay met a different operation than the checkpoint at the same id."""

    def __init__(self, message: str, step_id: str | None = None) -> None:
        super().__init__(message, TerminationReason.NON_DETERMINISTIC_EXECUTION)
        self.step_id = step_id


class InvocationError(UnrecoverableError):
    """The invocation fails and should be retried as a whole."""

    def __init__(
        self, message: str, termination_reason: TerminationReason = TerminationReason.INVOCATION_ERROR
    ) -> None:
        super().__init__(message, termination_reason)

    def is_retryable(self) -> bool:
        return True


class StepInterruptedError(InvocationError):
    """An AT_MOST_ONCE step was found started but never finished."""

    def __init__(self, message: str, step_id: str | None = None) -> None:
        super().__init__(message, TerminationReason.STEP_INTERRUPTED)
        self.step_id = step_id


class RetryableSerDesError(InvocationError):
    """A transient (de)serialization failure; the invocation should be retried."""

    def __init__(
        self, message: str, termination_reason: TerminationReason = TerminationReason.SERIALIZATION_ERROR
    ) -> None:
        super().__init__(message, termination_reason)


class PluginLoadError(DurableExecutionsError):
    """A plugin could not be loaded (plugins are accepted and ignored by durable_mp)."""


class OrderedLockError(DurableExecutionsError):
    """Reference-compatible name; durable_mp never raises it."""


class BotoClientError(InvocationError):
    """Reference-compatible name (service calls); durable_mp never raises it."""


class CheckpointError(BotoClientError):
    """Reference-compatible name: writing a checkpoint to the service failed."""


class GetExecutionStateError(BotoClientError):
    """Reference-compatible name: reading the execution state from the service failed."""


class SuspendExecution(PickleByState, BaseException):
    """Reference-compatible name: durable_mp waits in place instead of suspending."""


class TimedSuspendExecution(SuspendExecution):
    def __init__(self, message: str, scheduled_timestamp: float) -> None:
        super().__init__(message)
        self.scheduled_timestamp = scheduled_timestamp


class BackgroundThreadError(PickleByState, BaseException):
    """A background thread of the SDK failed."""

    def __init__(self, message: str, source_exception: BaseException) -> None:
        super().__init__(message)
        self.source_exception = source_exception


class OrphanedChildException(PickleByState, BaseException):
    """A branch tried to record work after its batch had already completed.

    A ``BaseException`` so that ``except Exception`` in user code cannot swallow it.
    """

    def __init__(self, message: str, operation_id: str) -> None:
        super().__init__(message)
        self.operation_id = operation_id


class ExecutionFailedError(DurableExecutionsError):
    """``handler.run()`` raises this when the execution ended FAILED.

    ``error`` is the checkpointed ``ErrorObject``, so the failure reads the same whether
    it happened just now or was stored by an earlier run.
    """

    def __init__(self, error: ErrorDetails, *, execution_id: str | None = None, stored: bool = False) -> None:
        self.error = error
        self.execution_id = execution_id
        kind = error.type or "Error"
        text = f"{kind}: {error.message}" if error.message else kind
        text += _where(error)
        if stored and execution_id:
            text += (f" (execution {execution_id!r} failed in an earlier run; delete it with "
                     f"`durable-mp delete {execution_id}` or use another execution_id to run it again)")
        super().__init__(text)
        # A stored failure has no live chain: show the worker-side traceback (``raise ... from``
        # replaces this with the live chain, which ends in the same traceback).
        self.__cause__ = remote_traceback(error.stack_trace)


def _where(error: ErrorDetails) -> str:
    """`` (raised as ZeroDivisionError at /path/job.py:12 in f)``: what a wrapper's one line hides."""
    return origin_note(error.type, error.stack_trace, error.message)


class ExecutionLockedError(DurableExecutionsError):
    """Another live driver owns this execution."""


class StoreError(DurableExecutionsError):
    """The checkpoint store is unusable (corrupt, unsafe permissions, full disk)."""


# Operation-error classes rebuilt from checkpoints, keyed by their wire ErrorType.
# Only our own classes: an unknown type name falls back to DurableOperationError so
# replay never calls a constructor it does not control.
_OPERATION_ERRORS: dict[str, type[DurableOperationError]] = {
    _qualified_name(cls): cls
    for cls in (
        StepError,
        InvokeError,
        ChildContextError,
        WaitForConditionError,
        CallbackError,
        CallbackExternalError,
        CallbackTimeoutError,
        CallbackSubmitterError,
        BatchCompletionError,
        WorkerCrashedError,
        StepTimeoutError,
        MemoryLimitExceededError,
    )
}


def register_operation_error(error_cls: type[DurableOperationError]) -> None:
    """Let ``from_error_fields`` rebuild ``error_cls`` (it must take the four fields)."""
    _OPERATION_ERRORS[_qualified_name(error_cls)] = error_cls


class CheckpointFailedError(BaseException):
    """Checkpoints could not be written, even after retries: the store is unwritable.

    A ``BaseException``, like ``BackgroundThreadError``, so that a handler's ``except
    Exception`` cannot swallow it by accident.  The store latches it and raises it again on
    every later write, so the execution stops as interrupted (RUNNING, resumable) and is
    never recorded SUCCEEDED with records missing.
    """


class ClusterUnavailableError(BaseException):
    """The Dask cluster (its scheduler, or every worker) stayed away longer than the run waits for it.

    A ``BaseException``, like ``CheckpointFailedError``, so that a handler's ``except
    Exception`` cannot swallow it: the execution stops as interrupted (RUNNING, resumable),
    never completed by failures and never SUCCEEDED with items missing.  Run it again once
    the cluster is back (or with the local backend) to resume it.
    """
