"""Callbacks: operations that another process completes (an approval, an external job).

``context.create_callback()`` checkpoints a CALLBACK operation (STARTED, committed before
it returns) and hands out its ``callback_id``.  Anyone with the id and the store
completes it (``store.callbacks.send_callback_success`` / ``send_callback_failure``, or
``durable-mp callback``), which writes the terminal record into the same LMDB store;
``callback.result()`` waits for that record.  Every completion from outside, and the
driver's timeout, is compare-and-set against the record it read (``Store.compare_and_set``):
an acknowledged completion is never overwritten, a late one is refused.  Inside a worker the wait is delegated to
the driver, the only process that reads the store during a run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from durable_mp import serdes as _serdes
from durable_mp.config import CallbackConfig, StepConfig, WaitForCallbackConfig
from durable_mp.core.callback_ids import decode_callback_id, encode_callback_id
from durable_mp.core.records import OpRecord, OpStatus, OpType
from durable_mp.core.vocabulary import SubType
from durable_mp.exceptions import CallbackError, CallbackExternalError, CallbackSubmitterError, StepError
from durable_mp.lambda_service import ErrorObject
from durable_mp.operation.protocol import DurableContextProtocol
from durable_mp.operation.replay import open_operation, raise_stored
from durable_mp.types import WaitForCallbackContext

if TYPE_CHECKING:
    from durable_mp.store.callbacks import send_callback_failure as send_callback_failure
    from durable_mp.store.callbacks import send_callback_heartbeat as send_callback_heartbeat
    from durable_mp.store.callbacks import send_callback_success as send_callback_success

_SENDERS = frozenset({"send_callback_failure", "send_callback_heartbeat", "send_callback_success"})


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
    opening = open_operation(ctx, ctx._next_id(), OpType.CALLBACK, config.sub_type or SubType.CALLBACK, name)
    rec = opening.record
    if rec is None:
        now = time.time()
        timeout, heartbeat = config.timeout.to_seconds(), config.heartbeat_timeout.to_seconds()
        rec = opening.started(now=now, extra={"deadline": now + timeout if timeout else None,
                                              "heartbeat_timeout": heartbeat or None})
        ctx.state.emit(rec, sync=True)  # the id must be resolvable before anyone can use it
    return Callback(ctx, rec, config.serdes)


def wait_for_callback(ctx: DurableContextProtocol, submitter: Callable[[str, WaitForCallbackContext], None],
                      name: str | None, config: WaitForCallbackConfig | None) -> Any:
    """A WaitForCallback context: create the callback, run the submitter step, wait."""
    config = config or WaitForCallbackConfig()
    op_id = ctx._next_id()
    opening = open_operation(ctx, op_id, OpType.CONTEXT, SubType.WAIT_FOR_CALLBACK, name)
    if opening.is_done:
        return opening.replay(_serdes.PassThroughSerDes() if config.serdes is None else config.serdes,
                              f"callback {name!r}", "CallbackError")
    # raw: the result is the callback's own text, not a serdes payload (history serializes it)
    base = opening.start(extra={"raw": True} if config.serdes is None else None)
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


__all__ = ["Callback", "CallbackExternalError", "create_callback", "decode_callback_id", "encode_callback_id",
           "send_callback_failure", "send_callback_heartbeat", "send_callback_success", "wait_for_callback"]


def __getattr__(name: str) -> Any:
    """The callback senders, imported on first use (PEP 562).

    They write the store from outside a run, so they live in ``store.callbacks``; the README
    documents them under this module, which keeps the names (the one import of ``store`` in
    ``operation``: tests/test_layering.py).  Imported lazily because the store brings lmdb and
    psutil, which a worker that only runs branches never needs.
    """
    if name not in _SENDERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from durable_mp.store.callbacks import send_callback_failure as send_callback_failure  # noqa: F401
    from durable_mp.store.callbacks import send_callback_heartbeat as send_callback_heartbeat  # noqa: F401
    from durable_mp.store.callbacks import send_callback_success as send_callback_success  # noqa: F401

    return locals()[name]
