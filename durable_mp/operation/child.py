"""``context.run_in_child_context``: a group of operations recorded (and replayed) as one.

A finished child context replays its result without running the function again, so
none of the operations inside it are even looked up.  A virtual child (``is_virtual``)
is no operation of its own: its operations are recorded under the enclosing context.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from durable_mp import serdes as _serdes
from durable_mp.config import ChildConfig
from durable_mp.core.records import OpStatus, OpType
from durable_mp.core.vocabulary import SubType
from durable_mp.exceptions import ChildContextError
from durable_mp.lambda_service import ErrorObject
from durable_mp.operation.naming import op_name
from durable_mp.operation.protocol import DurableContextProtocol
from durable_mp.operation.replay import open_operation
from durable_mp.operation.signature import check_child


def run_in_child_context(ctx: DurableContextProtocol, func: Callable[[Any], Any], name: str | None,
                         config: ChildConfig | None) -> Any:
    config = config or ChildConfig()
    check_child(func)
    name = op_name(func, name) if name is None else name
    op_id = ctx._next_id()
    child = ctx.create_child_context(op_id, is_virtual=config.is_virtual)
    if config.is_virtual:
        return func(child)
    opening = open_operation(ctx, op_id, OpType.CONTEXT, config.sub_type or SubType.RUN_IN_CHILD_CONTEXT, name)
    what = f"result of child context {name!r}"
    if opening.is_done:
        return opening.replay(config.serdes, what, "ChildContextError")
    base = opening.start()
    state = ctx.state
    try:
        value = func(child)
    except Exception as exc:  # noqa: BLE001 - every user error becomes a FAILED context
        err = ErrorObject.from_exception(exc)
        state.emit(base._replace(status=OpStatus.FAILED, end_ts=time.time(), error=err.to_dict()))
        raise ChildContextError(err.message, err.type, err.data, err.stack_trace) from err.to_exception()
    payload = _serdes.serialize(config.serdes, value, op_id=op_id, execution_id=state.execution_id, what=what)
    state.emit(base._replace(status=OpStatus.SUCCEEDED, end_ts=time.time(), result=payload))
    return _serdes.deserialize(config.serdes, payload, op_id=op_id, execution_id=state.execution_id, what=what)


__all__ = ["run_in_child_context"]
