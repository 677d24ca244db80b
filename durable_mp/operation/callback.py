"""Callbacks: operations that another process completes (an approval, an external job).

``context.create_callback()`` checkpoints a CALLBACK operation (STARTED, committed before
it returns) and hands out its ``callback_id``.  Anyone with the id and the store
completes it with ``send_callback_success`` / ``send_callback_failure`` (or
``durable-mp callback``), which writes the terminal record into the same LMDB store;
``callback.result()`` waits for that record.  Inside a worker the wait is delegated to
the driver, the only process that reads the store during a run.

A callback id is the operation's key (execution, parent, operation id), URL-safe base64.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from durable_mp import serdes as _serdes
from durable_mp.config import CallbackConfig, StepConfig, WaitForCallbackConfig
from durable_mp.core.callback_ids import decode_callback_id, encode_callback_id
from durable_mp.core.records import OpRecord, OpStatus, OpType
from durable_mp.core.vocabulary import SubType
from durable_mp.exceptions import (
    CallbackError,
    CallbackExternalError,
    CallbackSubmitterError,
    StepError,
    ValidationError,
)
from durable_mp.lambda_service import ErrorObject
from durable_mp.operation.protocol import DurableContextProtocol
from durable_mp.operation.replay import raise_stored
from durable_mp.store.facade import Store
from durable_mp.types import WaitForCallbackContext

TIMEOUT_MESSAGE = "Callback timed out"  # the reference's message and error types (its CallbackTimeoutType)
TIMEOUT_TYPE = "Callback.Timeout"
HEARTBEAT_TYPE = "Callback.Heartbeat"


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
    deadlines = [d for d in (extra.get("deadline"),) if d]
    if extra.get("heartbeat_timeout"):
        deadlines.append(extra.get("heartbeat", rec.start_ts) + extra["heartbeat_timeout"])
    return min(deadlines) if deadlines else None


def poll_callback(store: Any, execution_id: str, rec: OpRecord) -> OpRecord | None:
    """The callback's terminal record if it has one now (a timeout is recorded here), else None."""
    current = store.get_op(execution_id, rec.parent_id, rec.op_id) or rec
    if current.is_terminal:
        return current
    deadline = callback_deadline(current)
    if deadline is not None and time.time() >= deadline:
        done = timed_out_record(current)
        store.stage(execution_id, done)
        store.flush()
        return done
    return None


class Callback:
    """A pending callback: its ``callback_id`` to hand out, and ``result()`` to wait on."""

    def __init__(self, ctx: DurableContextProtocol, rec: OpRecord, serdes: Any) -> None:
        self._ctx = ctx
        self._rec = rec
        self._serdes = serdes
        self.operation_id = rec.op_id
        self.callback_id = encode_callback_id(ctx.state.execution_id, rec.parent_id, rec.op_id)

    def result(self) -> Any:
        """The payload the sender passed (a ``str`` unless a serdes is configured).

        Raises ``CallbackTimeoutError`` on timeout, ``CallbackExternalError`` if the sender
        reported failure.  A success sent without a result gives None.
        """
        rec = self._rec
        if not rec.is_terminal:
            rec = self._rec = self._ctx.state.wait_callback(rec)
        if rec.status in (OpStatus.FAILED, OpStatus.TIMED_OUT):
            raise_stored(rec, "CallbackExternalError")
        if rec.result is None or self._serdes is None:
            return rec.result
        return _serdes.deserialize(self._serdes, rec.result, op_id=rec.op_id,
                                   execution_id=self._ctx.state.execution_id, what=f"callback {rec.name!r}")


def create_callback(ctx: DurableContextProtocol, name: str | None, config: CallbackConfig | None) -> Callback:
    config = config or CallbackConfig()
    sub_type = config.sub_type or SubType.CALLBACK
    op_id = ctx._next_id()
    rec = ctx._checkpoint(op_id, OpType.CALLBACK, sub_type, name)
    if rec is None:
        now = time.time()
        timeout, heartbeat = config.timeout.to_seconds(), config.heartbeat_timeout.to_seconds()
        rec = OpRecord(op_id, ctx.record_parent, OpType.CALLBACK, sub_type, name, OpStatus.STARTED, now,
                       extra={"deadline": now + timeout if timeout else None,
                              "heartbeat_timeout": heartbeat or None})
        ctx.state.emit(rec, sync=True)  # the id must be resolvable before anyone can use it
    return Callback(ctx, rec, config.serdes)


def wait_for_callback(ctx: DurableContextProtocol, submitter: Callable[[str, WaitForCallbackContext], None],
                      name: str | None, config: WaitForCallbackConfig | None) -> Any:
    """A WaitForCallback context: create the callback, run the submitter step, wait."""
    config = config or WaitForCallbackConfig()
    op_id = ctx._next_id()
    rec = ctx._checkpoint(op_id, OpType.CONTEXT, SubType.WAIT_FOR_CALLBACK, name)
    if rec is not None and rec.is_terminal:
        return ctx._replayed(rec, _serdes.PassThroughSerDes() if config.serdes is None else config.serdes,
                             f"callback {name!r}", "CallbackError")
    # raw: the result is the callback's own text, not a serdes payload (history serializes it)
    base = rec or OpRecord(op_id, ctx.record_parent, OpType.CONTEXT, SubType.WAIT_FOR_CALLBACK, name,
                           OpStatus.STARTED, time.time(), extra={"raw": True} if config.serdes is None else None)
    if rec is None:
        ctx.state.emit(base)
    child = ctx.create_child_context(op_id)
    prefix = f"{name} " if name else ""
    try:
        callback = child.create_callback(name=f"{prefix}create callback id", config=CallbackConfig(
            timeout=config.timeout, heartbeat_timeout=config.heartbeat_timeout, serdes=config.serdes))
        try:
            child.step(lambda step_ctx: submitter(callback.callback_id, WaitForCallbackContext(step_ctx.logger)),
                       name=f"{prefix}submitter", config=StepConfig(retry_strategy=config.retry_strategy))
        except StepError as exc:
            raise CallbackSubmitterError(exc.message, exc.error_type, exc.data, exc.stack_trace) from exc
        value = callback.result()
    except CallbackError as exc:
        err = ErrorObject.from_exception(exc)
        ctx.state.emit(base._replace(status=OpStatus.FAILED, end_ts=time.time(), error=err.to_dict(),
                                     extra={**(base.extra or {}), "raise": type(exc).__name__}))
        raise
    payload = value if config.serdes is None else _serdes.serialize(
        config.serdes, value, op_id=op_id, execution_id=ctx.state.execution_id, what=f"callback {name!r}")
    ctx.state.emit(base._replace(status=OpStatus.SUCCEEDED, end_ts=time.time(), result=payload))
    return value


# -- the sender's side ------------------------------------------------------------------------
def _complete(callback_id: str, store: Any, update: Callable[[OpRecord], OpRecord]) -> None:
    execution_id, parent_id, op_id = decode_callback_id(callback_id)
    db = store if isinstance(store, Store) else Store(store, create=False)
    try:
        rec = db.get_op(execution_id, parent_id, op_id)
        if rec is None or rec.op_type != OpType.CALLBACK:
            raise ValidationError(f"no callback {callback_id!r} in execution {execution_id!r}")
        if rec.is_terminal:
            raise ValidationError(f"callback {rec.name or callback_id!r} is already {rec.status}")
        db.stage(execution_id, update(rec))
        db.flush()
    finally:
        if db is not store:
            db.close()


def send_callback_success(callback_id: str, result: bytes | str | None = None, *, store: Any = None) -> None:
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


def send_callback_failure(callback_id: str, error: ErrorObject | None = None, *, store: Any = None) -> None:
    """Fail a callback; ``callback.result()`` raises ``CallbackExternalError`` with ``error``'s fields."""
    error = error or ErrorObject("callback failed", "CallbackExternalError", None, None)
    _complete(callback_id, store, lambda rec: rec._replace(
        status=OpStatus.FAILED, end_ts=time.time(), error=error.to_dict(),
        extra={**(rec.extra or {}), "raise": "CallbackExternalError"}))


def send_callback_heartbeat(callback_id: str, *, store: Any = None) -> None:
    """Keep a callback with a ``heartbeat_timeout`` alive."""
    _complete(callback_id, store, lambda rec: rec._replace(extra={**(rec.extra or {}), "heartbeat": time.time()}))


__all__ = ["Callback", "CallbackExternalError", "decode_callback_id", "encode_callback_id", "send_callback_failure",
           "send_callback_heartbeat", "send_callback_success"]
