"""``context.wait_for_condition``: poll a check function, checkpointing the state each time.

Recorded as STEP/WaitForCondition: every poll that asks to continue writes a PENDING
checkpoint holding the state and the next poll's time, so a resumed execution continues
from the last state instead of the initial one.  A fix-and-resume re-run of a failed one
(``core.reopen``) continues the poll numbering and gives the wait strategy its whole
attempt budget again, as a reopened step's retry strategy gets.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from durable_mp import serdes as _serdes
from durable_mp.core.records import Attempt, OpStatus, OpType
from durable_mp.core.reopen import RERUN_BASE
from durable_mp.core.vocabulary import SubType
from durable_mp.exceptions import WaitForConditionError
from durable_mp.lambda_service import ErrorObject
from durable_mp.operation.naming import op_name
from durable_mp.operation.protocol import DurableContextProtocol
from durable_mp.operation.replay import open_operation
from durable_mp.types import WaitForConditionCheckContext
from durable_mp.waits import WaitForConditionConfig


def run_wait_for_condition(ctx: DurableContextProtocol, check: Callable[[Any, Any], Any],
                           config: WaitForConditionConfig[Any], name: str | None) -> Any:
    name = op_name(check, name)
    op_id = ctx._next_id()
    opening = open_operation(ctx, op_id, OpType.STEP, SubType.WAIT_FOR_CONDITION, name)
    what = f"state of wait_for_condition {name!r}"
    exec_id = ctx.state.execution_id
    if opening.is_done:
        return opening.replay(config.serdes, what, "WaitForConditionError")
    rec = opening.record
    base = opening.started()
    state = config.initial_state
    if rec is not None and rec.result is not None:
        state = _serdes.deserialize(config.serdes, rec.result, op_id=op_id, execution_id=exec_id, what=what)
        if rec.next_attempt_ts:
            ctx.state.sleep_until(rec.next_attempt_ts)
    attempt = base.attempt
    attempts = list(base.attempts)
    # polls made before a fix-and-resume re-run (core.reopen): numbering continues, the budget restarts
    first = (base.extra or {}).get(RERUN_BASE, 0)
    while True:
        attempt += 1
        started = time.time()
        try:
            state = check(state, WaitForConditionCheckContext(ctx.logger.with_extra(attempt=attempt), attempt))
            decision = config.wait_strategy(state, attempt - first)
        except Exception as exc:  # noqa: BLE001 - a failing check fails the operation
            err = ErrorObject.from_exception(exc)
            attempts.append(Attempt(attempt, started, time.time(), os.getpid(), err.to_dict()))
            ctx.state.emit(base._replace(status=OpStatus.FAILED, end_ts=time.time(), attempt=attempt,
                                         error=err.to_dict(), attempts=tuple(attempts)))
            raise WaitForConditionError(err.message, err.type, err.data, err.stack_trace) from err.to_exception()
        attempts.append(Attempt(attempt, started, time.time(), os.getpid()))
        payload = _serdes.serialize(config.serdes, state, op_id=op_id, execution_id=exec_id, what=what)
        if not decision.should_continue:
            ctx.state.emit(base._replace(status=OpStatus.SUCCEEDED, end_ts=time.time(), attempt=attempt,
                                         result=payload, attempts=tuple(attempts)))
            return _serdes.deserialize(config.serdes, payload, op_id=op_id, execution_id=exec_id, what=what)
        delay = decision.delay_seconds
        attempts[-1] = attempts[-1]._replace(retry_delay=delay)  # the history's NextAttemptDelaySeconds
        ctx.state.emit(base._replace(status=OpStatus.PENDING, attempt=attempt, result=payload,
                                     next_attempt_ts=time.time() + delay, attempts=tuple(attempts)))
        ctx.state.sleep(delay)
