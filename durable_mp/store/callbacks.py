"""A callback's record, completed from outside the driver or timed out by it.

Anyone with a callback id and the store completes the callback with
``send_callback_success`` / ``send_callback_failure`` (or ``durable-mp callback``), which
writes the terminal record into the same LMDB store.  The driver, waiting on the
callback (``operation.callback``), reads it back with ``poll_callback``, which also
records a timeout once the callback's deadline or heartbeat has passed.  Every completion
from outside, and the driver's timeout, is compare-and-set against the record it read
(``Store.compare_and_set``): an acknowledged completion is never overwritten, a late one
is refused.

A callback id is the operation's key (execution, parent, operation id), URL-safe base64.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from durable_mp.core.callback_ids import decode_callback_id
from durable_mp.core.records import OpRecord, OpStatus, OpType
from durable_mp.exceptions import ValidationError
from durable_mp.lambda_service import ErrorObject
from durable_mp.store.facade import Store

COMPLETE_ATTEMPTS = 1000  # compare-and-set rounds lost to concurrent heartbeats before a sender gives up
TIMEOUT_MESSAGE = "Callback timed out"  # the reference's message and error types (its CallbackTimeoutType)
TIMEOUT_TYPE = "Callback.Timeout"
HEARTBEAT_TYPE = "Callback.Heartbeat"

# a path (or None: DURABLE_MP_STORE / the default) is opened for one write
StoreOrPath = Store | str | os.PathLike[str] | None


# -- the driver's side -------------------------------------------------------------------------
def timed_out_record(rec: OpRecord, now: float | None = None) -> OpRecord:
    """``rec`` TIMED_OUT with the reference's error (``Callback.Timeout`` / ``Callback.Heartbeat``)."""
    now = time.time() if now is None else now
    extra = rec.extra or {}
    deadline = extra.get("deadline")
    kind = TIMEOUT_TYPE if deadline and now >= deadline else HEARTBEAT_TYPE
    err = ErrorObject(TIMEOUT_MESSAGE, kind, None, None)
    return rec._replace(status=OpStatus.TIMED_OUT, end_ts=now, error=err.to_dict(),
                        extra={**extra, "raise": "CallbackTimeoutError"})


def callback_deadline(rec: OpRecord) -> float | None:
    """When a STARTED callback times out: its own timeout, or its heartbeat's."""
    extra = rec.extra or {}
    deadlines: list[float] = [d for d in (extra.get("deadline"),) if d]
    if extra.get("heartbeat_timeout"):
        deadlines.append(extra.get("heartbeat", rec.start_ts) + extra["heartbeat_timeout"])
    return min(deadlines) if deadlines else None


def poll_callback(store: Store, execution_id: str, rec: OpRecord) -> OpRecord | None:
    """The callback's terminal record if it has one now (a timeout is recorded here), else None.

    The timeout is compare-and-set against the record just read: a sender that completed the
    callback meanwhile wins, and its record is returned instead.
    """
    current, version = store.get_op_version(execution_id, rec.parent_id, rec.op_id)
    current = current or rec
    if current.is_terminal:
        return current
    deadline = callback_deadline(current)
    if deadline is not None and time.time() >= deadline:
        done = timed_out_record(current)
        written, now = store.compare_and_set(execution_id, rec.parent_id, rec.op_id, version, done)
        if written:
            return done
        return now if now is not None and now.is_terminal else None  # moved on (a heartbeat): poll again
    return None


# -- the sender's side -------------------------------------------------------------------------
def _complete(callback_id: str, store: StoreOrPath, update: Callable[[OpRecord], OpRecord]) -> None:
    """Apply ``update`` to a waiting callback, compare-and-set against the version read.

    Racing with another sender or the driver's timeout: if the record changed since it was
    read, it is read again; once it is terminal the late completion is refused
    (``ValidationError``), so an acknowledged completion is never overwritten.
    """
    execution_id, parent_id, op_id = decode_callback_id(callback_id)
    db = store if isinstance(store, Store) else Store(store, create=False)
    try:
        for _ in range(COMPLETE_ATTEMPTS):
            rec, version = db.get_op_version(execution_id, parent_id, op_id)
            if rec is None or rec.op_type != OpType.CALLBACK:
                raise ValidationError(f"no callback {callback_id!r} in execution {execution_id!r}")
            if rec.is_terminal:
                raise ValidationError(f"callback {rec.name or callback_id!r} is already {rec.status}")
            written, _ = db.compare_and_set(execution_id, parent_id, op_id, version, update(rec))
            if written:
                return
        raise ValidationError(f"callback {callback_id!r} kept changing under {COMPLETE_ATTEMPTS} attempts to "
                              f"complete it")
    finally:
        if db is not store:
            db.close()


def send_callback_success(callback_id: str, result: bytes | str | None = None, *, store: StoreOrPath = None) -> None:
    """Complete a callback with ``result`` (bytes are decoded as UTF-8 when they are text).

    An empty or missing result is allowed, as in the reference: ``callback.result()`` is None.
    """
    if not result:
        result = None
    elif isinstance(result, bytes):
        try:
            result = result.decode()
        except UnicodeDecodeError:
            pass
    _complete(callback_id, store, lambda rec: rec._replace(status=OpStatus.SUCCEEDED, end_ts=time.time(),
                                                           result=result))


def send_callback_failure(callback_id: str, error: ErrorObject | None = None, *, store: StoreOrPath = None) -> None:
    """Fail a callback; ``callback.result()`` raises ``CallbackExternalError`` with ``error``'s fields."""
    error = error or ErrorObject("callback failed", "CallbackExternalError", None, None)
    _complete(callback_id, store, lambda rec: rec._replace(
        status=OpStatus.FAILED, end_ts=time.time(), error=error.to_dict(),
        extra={**(rec.extra or {}), "raise": "CallbackExternalError"}))


def send_callback_heartbeat(callback_id: str, *, store: StoreOrPath = None) -> None:
    """Keep a callback with a ``heartbeat_timeout`` alive."""
    _complete(callback_id, store, lambda rec: rec._replace(extra={**(rec.extra or {}), "heartbeat": time.time()}))


__all__ = ["callback_deadline", "poll_callback", "send_callback_failure", "send_callback_heartbeat",
           "send_callback_success", "timed_out_record"]
