"""Rebuild the exception a failed operation raised, from its checkpoint.

The original exception object never crosses a process boundary or a restart; what
users see (first run and replay alike) is the SDK error type rebuilt from the stored
``ErrorObject``, with a ``DurableOperationError`` as ``__cause__``, as in the reference.
"""

from __future__ import annotations

from typing import NoReturn

from durable_mp import exceptions
from durable_mp.core.records import OpRecord
from durable_mp.lambda_service import ErrorObject


def error_class(name: str | None, default: str) -> type[Exception]:
    cls = getattr(exceptions, name or default, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = getattr(exceptions, default)
    return cls


def build_error(err: ErrorObject, cls_name: str) -> Exception:
    cls = error_class(cls_name, "DurableOperationError")
    if issubclass(cls, exceptions.DurableOperationError) or cls is exceptions.SerDesError:
        return cls(message=err.message, error_type=err.type, data=err.data, stack_trace=err.stack_trace)
    return cls(err.message)


def raise_stored(rec: OpRecord, default_cls: str) -> NoReturn:
    """Raise the error recorded in a FAILED checkpoint as the SDK would have."""
    err = ErrorObject.from_dict(rec.error or {})
    cls_name = (rec.extra or {}).get("raise", default_cls)
    raise build_error(err, cls_name) from err.to_exception()
