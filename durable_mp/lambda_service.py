"""Wire-level names of the reference service: operation enums and ``ErrorObject``.

The enum values are the strings ``records.OpType``/``records.OpStatus`` store, so a
record converts with ``OperationType(rec.op_type)``.
"""

from __future__ import annotations

import builtins
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, NoReturn

from durable_mp._compat import StrEnum
from durable_mp.core.remote import remote_traceback
from durable_mp.core.text import safe_str
from durable_mp.core.vocabulary import SubType
from durable_mp.exceptions import ChildContextError, DurableOperationError, SerDesError

_SERDES_ERROR_TYPE = f"{SerDesError.__module__}.{SerDesError.__qualname__}"


class OperationType(Enum):
    EXECUTION = "EXECUTION"
    CONTEXT = "CONTEXT"
    STEP = "STEP"
    WAIT = "WAIT"
    CALLBACK = "CALLBACK"
    CHAINED_INVOKE = "CHAINED_INVOKE"


class OperationSubType(StrEnum):
    """Sub-types durable_mp records for its own operations (history ``SubType``; values in ``core.vocabulary``)."""

    STEP = SubType.STEP
    WAIT = SubType.WAIT
    CALLBACK = SubType.CALLBACK
    RUN_IN_CHILD_CONTEXT = SubType.RUN_IN_CHILD_CONTEXT
    MAP = SubType.MAP
    MAP_ITERATION = SubType.MAP_ITERATION
    PARALLEL = SubType.PARALLEL
    PARALLEL_BRANCH = SubType.PARALLEL_BRANCH
    WAIT_FOR_CALLBACK = SubType.WAIT_FOR_CALLBACK
    WAIT_FOR_CONDITION = SubType.WAIT_FOR_CONDITION
    CHAINED_INVOKE = SubType.CHAINED_INVOKE


class OperationStatus(Enum):
    STARTED = "STARTED"
    PENDING = "PENDING"
    READY = "READY"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"
    STOPPED = "STOPPED"


class OperationAction(Enum):
    START = "START"
    SUCCEED = "SUCCEED"
    FAIL = "FAIL"
    RETRY = "RETRY"
    CANCEL = "CANCEL"


class InvocationStatus(Enum):
    """Outcome of running a handler (``{"Status": ...}`` in the Lambda envelope)."""

    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    PENDING = "PENDING"
    RETRY = "RETRY"  # the reference's "invoke me again"; a local run never returns it


def error_type_name(error: BaseException) -> str:
    """Wire ErrorType: ``ValueError`` for builtins, ``module.QualName`` otherwise."""
    cls = type(error)
    if cls.__module__ == builtins.__name__:
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _text(value: Any) -> str | None:
    """A field of an operation error as the plain string a checkpoint holds (user code may set anything)."""
    return value if value is None or value.__class__ is str else safe_str(value)


def _lines(value: Any) -> list[str] | None:
    return None if value is None else [_text(line) or "" for line in value]


# A checkpointed value as the reference types it (its serdes writes strings; durable_mp's
# default may also write pickle bytes).
OperationPayload = str


@dataclass(frozen=True)
class ErrorObject:
    """A failure as checkpointed: plain strings, so it survives any process or store."""

    message: str | None
    type: str | None
    data: str | None = None
    stack_trace: list[str] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErrorObject:
        return cls(
            message=data.get("ErrorMessage"),
            type=data.get("ErrorType"),
            data=data.get("ErrorData"),
            stack_trace=data.get("StackTrace"),
        )

    @classmethod
    def from_message(cls, message: str) -> ErrorObject:
        return cls(message=message, type=None)

    @classmethod
    def from_exception(cls, error: BaseException) -> ErrorObject:
        """Capture ``error`` for a checkpoint.

        Operation and serdes errors carry their own fields (their ``stack_trace`` is
        the origin's).  For any other exception durable_mp keeps the formatted
        traceback, where the reference stores ``None``: a branch fails in another
        process, and its traceback is the only way to find the failing line.
        Never raises: an exception whose ``str()`` raises is captured with a message
        that says so (``safe_str``), so recording a failure cannot fail in turn.
        """
        if isinstance(error, SerDesError):
            # Pinned to the base type so replay rebuilds it as SerDesError.
            return cls(_text(error.message), _SERDES_ERROR_TYPE, _text(error.data), _lines(error.stack_trace))
        if isinstance(error, DurableOperationError):
            return cls(_text(error.message), error_type_name(error), _text(error.data), _lines(error.stack_trace))
        message = safe_str(error)
        try:
            stack_trace = traceback.format_exception(error)
        except Exception:  # noqa: BLE001 - e.g. a user's __notes__ or __cause__ that breaks the formatter
            stack_trace = None
        return cls(message=message, type=error_type_name(error), data=None, stack_trace=stack_trace)

    def to_dict(self) -> dict[str, Any]:
        """Wire form; ``None`` fields are omitted."""
        wire = {
            "ErrorMessage": self.message,
            "ErrorType": self.type,
            "ErrorData": self.data,
            "StackTrace": list(self.stack_trace) if self.stack_trace is not None else None,
        }
        return {key: value for key, value in wire.items() if value is not None}

    def to_exception(self) -> DurableOperationError:
        """The escaping error rebuilt from these fields (a typed subclass if known).

        A stored traceback becomes its ``__cause__``, a ``RemoteTraceback``: printed, the
        chain starts with the worker-side traceback (the user's file and line), as
        ``concurrent.futures`` shows a failure in a pool process.
        """
        error = DurableOperationError.from_error_fields(self.type, self.message, self.data, self.stack_trace)
        error.__cause__ = remote_traceback(self.stack_trace)
        return error

    # Reference name of the same thing.
    to_durable_operation_error = to_exception

    def raise_as_operation_error(
        self, operation_error_cls: builtins.type[DurableOperationError] = ChildContextError
    ) -> NoReturn:  # ``builtins.type``: inside this class, ``type`` is the field
        """Raise ``operation_error_cls`` with these fields, from the rebuilt error.

        The same path serves the first run and replay, so both raise the same thing.
        A serdes failure stays a ``SerDesError`` whatever operation it came from.
        """
        cause = self.to_exception()
        wrapper = SerDesError if self.type == _SERDES_ERROR_TYPE else operation_error_cls
        raise wrapper(
            message=self.message, error_type=self.type, data=self.data, stack_trace=self.stack_trace
        ) from cause
