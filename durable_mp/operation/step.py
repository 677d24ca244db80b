"""The attempt loop of ``context.step``: run, checkpoint, ask the retry strategy, repeat.

A retry sleeps in place (the reference suspends the invocation instead); the PENDING
checkpoint written before the sleep keeps the attempt count and next-attempt time, so a
killed run resumes the countdown rather than restarting it.  An attempt the driver had
to kill (timeout, memory limit) arrives here as an *undecided* PENDING checkpoint, and an
``AT_MOST_ONCE_PER_RETRY`` attempt cut short by a crash (of its worker or of the driver)
as a STARTED one; both are recorded as attempts and handed to the retry strategy like
any other failure.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from durable_mp import serdes as _serdes
from durable_mp.config import StepConfig, StepSemantics, timeout_seconds
from durable_mp.core.records import Attempt, OpRecord, OpStatus, OpType
from durable_mp.core.remote import user_frame
from durable_mp.core.reopen import RERUN_BASE
from durable_mp.core.vocabulary import SubType
from durable_mp.exceptions import SerDesError, StepError
from durable_mp.lambda_service import ErrorObject
from durable_mp.operation.naming import op_name
from durable_mp.operation.replay import Opening, open_operation
from durable_mp.operation.signature import check_step
from durable_mp.retries import RetryPresets
from durable_mp.types import StepContext

if TYPE_CHECKING:
    from durable_mp.operation.protocol import DurableContextProtocol

_DEFAULT_STRATEGY = None


def default_strategy() -> Callable:
    """The reference's default when ``StepConfig.retry_strategy`` is None (6 attempts)."""
    global _DEFAULT_STRATEGY
    if _DEFAULT_STRATEGY is None:
        _DEFAULT_STRATEGY = RetryPresets.default()
    return _DEFAULT_STRATEGY


class StepWatch:
    """What the driver needs to enforce a step's timeout or memory limit from outside."""

    __slots__ = ("record", "timeout")

    def __init__(self, record: OpRecord, timeout: float | None) -> None:
        self.record = record
        self.timeout = timeout


def _with_cut_short_attempt(rec: OpRecord, attempts: list[Attempt], error: Exception) -> list[Attempt]:
    """``attempts`` ending with attempt ``rec.attempt``, the one a crash cut short.

    A killed attempt (timeout, memory limit) is recorded by the driver that killed it;
    one interrupted by a driver crash has no record yet: nobody saw it end.  Its end is
    unknown (None), its start is when it could begin: after the previous attempt and its
    retry delay, or when the step started.
    """
    if attempts and attempts[-1].number == rec.attempt:
        return attempts
    if attempts:
        last = attempts[-1]
        start = (last.end_ts or last.start_ts) + (last.retry_delay or 0.0)
    else:
        start = rec.start_ts
    err = ErrorObject.from_exception(error).to_dict()
    return [*attempts, Attempt(rec.attempt, min(start, time.time()), None, rec.pid, err)]


def max_attempts(strategy: Callable) -> int | None:
    """The ``m`` of "attempt n of m", when the strategy is one of ``retries``' closures (else None)."""
    try:
        found = inspect.getclosurevars(strategy).nonlocals.get("max_attempts")
    except (TypeError, ValueError):
        return None
    return found if isinstance(found, int) else None


def retry_message(name: str | None, attempt: int, of: int | None, err: ErrorObject, delay: float) -> str:
    """``step 'fetch' attempt 1 of 6 failed: ConnectionError: reset (at job.py:12 in fetch); retrying in 5s``."""
    what = f"step {name!r}" if name else "step"
    count = f"attempt {attempt} of {of}" if of else f"attempt {attempt}"
    frame = user_frame(err.stack_trace)
    where = f" (at {frame})" if frame is not None else ""
    return f"{what} {count} failed: {err.type}: {err.message}{where}; will retry in {delay:g}s"


def step(ctx: DurableContextProtocol, func: Callable, name: str | None, config: StepConfig | None) -> Any:
    """``context.step``: replay a finished step, else run it (again) under its retry strategy."""
    config = config or StepConfig()
    check_step(func)  # before anything is recorded: a wrong signature is not retried
    name = op_name(func, name)
    opening = open_operation(ctx, ctx._next_id(), OpType.STEP, config.sub_type or SubType.STEP, name)
    if opening.is_done:
        return opening.replay(config.serdes, f"result of step {name!r}", "StepError")
    return run_step(ctx, opening, func, config)


def run_step(ctx: DurableContextProtocol, opening: Opening, func: Callable, config: StepConfig) -> Any:
    state = ctx.state
    op_id, name, rec = opening.op_id, opening.name, opening.record
    strategy = config.retry_strategy or default_strategy()
    at_most_once = config.step_semantics == StepSemantics.AT_MOST_ONCE_PER_RETRY
    timeout = timeout_seconds(config.timeout)
    what = f"result of step {name!r}"
    base = opening.started()
    attempt = base.attempt
    attempts = list(base.attempts)
    # attempts made before a fix-and-resume re-run (core.reopen): numbering continues, the budget restarts
    first = opening.rerun_base
    rerun_extra = {RERUN_BASE: first} if first else None
    error = opening.unjudged_error(at_most_once)
    if error is not None:  # an attempt of an earlier run the retry strategy has not judged
        attempts = _with_cut_short_attempt(base, attempts, error)
    if error is None and rec is not None and rec.status == OpStatus.PENDING and rec.next_attempt_ts:
        state.sleep_until(rec.next_attempt_ts)
    logger = ctx.logger.with_extra(operationId=op_id, operationName=name)
    while True:
        if error is None:
            attempt += 1
            started = time.time()
            running = base._replace(status=OpStatus.STARTED, attempt=attempt, error=None, next_attempt_ts=None,
                                    attempts=tuple(attempts))
            if at_most_once:  # the only STARTED step record (the Dask backend refuses it in branches)
                state.emit(running, sync=True)
            watch = StepWatch(running, timeout) if (timeout or state.watch_steps) else None
            try:
                value = state.run_step_body(func, StepContext(logger.with_extra(attempt=attempt), attempt), watch)
                payload = _serdes.serialize(config.serdes, value, op_id=op_id, execution_id=state.execution_id,
                                            what=what)
            except SerDesError as exc:
                err = ErrorObject.from_exception(exc)
                attempts.append(Attempt(attempt, started, time.time(), os.getpid(), err.to_dict()))
                state.emit(running._replace(status=OpStatus.FAILED, end_ts=time.time(), error=err.to_dict(),
                                            attempts=tuple(attempts), extra={"raise": "SerDesError"}))
                raise
            except Exception as exc:  # noqa: BLE001 - the retry strategy judges every user error
                error = exc
                attempts.append(Attempt(attempt, started, time.time(), os.getpid(),
                                        ErrorObject.from_exception(exc).to_dict()))
            else:
                ended = time.time()
                attempts.append(Attempt(attempt, started, ended, os.getpid()))
                state.emit(running._replace(status=OpStatus.SUCCEEDED, end_ts=ended, result=payload,
                                            attempts=tuple(attempts)))
                return _serdes.deserialize(config.serdes, payload, op_id=op_id, execution_id=state.execution_id,
                                           what=what)
        err = ErrorObject.from_exception(error)
        decision = strategy(error, attempt - first)
        if decision.should_retry:
            delay = decision.delay_seconds
            # loud by default: a retried step is otherwise silent for as long as its backoff lasts
            logger.warning(retry_message(name, attempt - first, max_attempts(strategy), err, delay))
            attempts[-1] = attempts[-1]._replace(retry_delay=delay)
            state.emit(base._replace(status=OpStatus.PENDING, attempt=attempt, error=err.to_dict(),
                                     next_attempt_ts=time.time() + delay, attempts=tuple(attempts),
                                     extra=rerun_extra))
            state.sleep(delay)
            error = None
            continue
        state.emit(base._replace(status=OpStatus.FAILED, end_ts=time.time(), attempt=attempt, error=err.to_dict(),
                                 attempts=tuple(attempts), extra=None))
        raise StepError(err.message, err.type, err.data, err.stack_trace) from err.to_exception()
