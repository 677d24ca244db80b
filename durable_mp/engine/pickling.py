"""cloudpickle, but tracebacks from workers still name the user's file and line.

cloudpickle >= 3.1 replaces ``co_filename`` of by-value code with ``"<dynamic-code>"``
(for deterministic payloads).  A branch that fails in a worker would then report
``File "<dynamic-code>"`` with no source line.  This pickler keeps the real filename;
nothing else about the payload changes.
"""

from __future__ import annotations

import functools
import io
import pickle
import types
from collections.abc import Callable
from typing import Any

from durable_mp.core.vocabulary import PICKLE_PROTOCOL

_DYNAMIC = "<dynamic-code>"


@functools.cache
def _pickler() -> Any:
    """The pickler class, made on the first dump: a worker only loads, and a cloudpickle stream
    loads with plain pickle, so a worker never imports cloudpickle unless a branch needs it."""
    import cloudpickle

    code_reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)

    class _Pickler(cloudpickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if code_reduce is not None and type(obj) is types.CodeType:
                func, args = code_reduce(obj)
                return func, tuple(obj.co_filename if isinstance(a, str) and a == _DYNAMIC else a for a in args)
            return super().reducer_override(obj)

    return _Pickler


def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _pickler()(buf, protocol=PICKLE_PROTOCOL).dump(obj)
    return buf.getvalue()


def dumps_out_of_band(obj: Any) -> tuple[bytes, list[memoryview]]:
    """The pickle stream of ``obj`` without its large contiguous buffers (numpy arrays), and those
    buffers as views: ``loads(stream, buffers=...)`` rebuilds ``obj`` (pickle protocol 5, PEP 574)."""
    buffers: list[pickle.PickleBuffer] = []
    buf = io.BytesIO()
    _pickler()(buf, protocol=max(PICKLE_PROTOCOL, 5), buffer_callback=buffers.append).dump(obj)
    return buf.getvalue(), [b.raw() for b in buffers]


loads: Callable[..., Any] = pickle.loads  # what cloudpickle.loads is


def call_outcome(ok: bool, value: Any) -> Any:
    """What a driver-level step's call in a worker (``CallResult``) returned, or raise what it raised.

    A failure comes as the exception, pickled or not, or, when it did not survive pickling,
    as its ``ErrorObject`` text (as the reference keeps an error) and class name.
    """
    if ok:
        return pickle.loads(value)
    if isinstance(value, BaseException):
        raise value
    if isinstance(value, bytes):
        raise pickle.loads(value)
    err, _cls_name = value
    from durable_mp.lambda_service import ErrorObject  # driver side only: workers never load it from here

    raise ErrorObject.from_dict(err).to_exception()
