"""Replay: what the store already says about an operation, asked in one place.

Every operation opens through ``open_operation`` (the reference's ``CheckResult``).  The
answer is an ``Opening``, one of three:

* nothing recorded: the first run of this operation, which records ``started()`` and runs;
* an unfinished record (STARTED, PENDING, or an attempt a fix-and-resume re-run reopened,
  ``core.reopen``): the operation continues it, see ``unjudged_error`` and ``rerun_base``;
* a terminal record: ``replay()`` returns the stored result or raises the stored error,
  and no user code runs.

A record whose type, sub-type, name or parent differ from the code's is not an answer:
``open_operation`` raises ``NonDeterministicExecutionError``.

The original exception object never crosses a process boundary or a restart; what users
see (first run and replay alike) is the SDK error type rebuilt from the stored
``ErrorObject``, with a ``DurableOperationError`` as ``__cause__``, as in the reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, NoReturn

from durable_mp import exceptions
from durable_mp import serdes as _serdes
from durable_mp.core.item_probe import split_terminal
from durable_mp.core.records import OpRecord, OpStatus, identity_mismatch
from durable_mp.core.reopen import RERUN_BASE
from durable_mp.engine.result_decode import COMPACT_ITEM, IN_STORE
from durable_mp.engine.state import ContextState
from durable_mp.exceptions import NonDeterministicExecutionError, StepInterruptedError
from durable_mp.lambda_service import ErrorObject
from durable_mp.operation.protocol import DurableContextProtocol


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


@dataclass(frozen=True)
class Opening:
    """What the store said when an operation opened (see the module docstring)."""

    state: ContextState
    op_id: str
    parent_id: str
    op_type: str
    sub_type: str
    name: str | None
    record: OpRecord | None  # the stored record, None on a first run

    @property
    def is_done(self) -> bool:
        """A terminal record: ``replay()``, run nothing."""
        return self.record is not None and self.record.is_terminal

    @property
    def is_new(self) -> bool:
        """Nothing recorded: the STARTED record is still to be written."""
        return self.record is None

    def started(self, *, now: float | None = None, extra: dict[str, Any] | None = None) -> OpRecord:
        """The record the operation moves on from: the stored one, else a new STARTED one (not emitted)."""
        if self.record is not None:
            return self.record
        return OpRecord(self.op_id, self.parent_id, self.op_type, self.sub_type, self.name, OpStatus.STARTED,
                        time.time() if now is None else now, extra=extra)

    def start(self, *, sync: bool = False, extra: dict[str, Any] | None = None) -> OpRecord:
        """``started()``, emitted if it is new: the common opening of an operation that runs."""
        rec = self.started(extra=extra)
        if self.record is None:
            self.state.emit(rec, sync=sync)
        return rec

    def replay(self, serdes: Any, what: str, error_cls: str) -> Any:
        """The stored result (deserialized), or the stored error raised as ``error_cls``."""
        rec = self.record
        assert rec is not None and rec.is_terminal, "only a finished operation replays"
        if rec.status == OpStatus.SUCCEEDED:
            # a None result goes to the serdes as stored (a pass-through serdes returns it)
            return _serdes.deserialize(serdes, rec.result, op_id=rec.op_id,  # type: ignore[arg-type]
                                       execution_id=self.state.execution_id, what=what)
        raise_stored(rec, error_cls)

    def unjudged_error(self, at_most_once: bool) -> Exception | None:
        """An attempt of an earlier run whose error the retry strategy has not judged yet.

        An attempt the driver had to kill (timeout, memory limit) is recorded as an
        *undecided* PENDING record; an ``AT_MOST_ONCE_PER_RETRY`` attempt cut short by a
        crash is a STARTED one.
        """
        rec = self.record
        if rec is None:
            return None
        extra = rec.extra or {}
        if rec.status == OpStatus.PENDING and extra.get("undecided"):
            return build_error(ErrorObject.from_dict(rec.error or {}), extra.get("exc", "DurableOperationError"))
        if rec.status == OpStatus.STARTED and at_most_once:
            return StepInterruptedError(f"step {rec.name!r} was interrupted during attempt {rec.attempt}", rec.op_id)
        return None

    @property
    def rerun_base(self) -> int:
        """Attempts made before a fix-and-resume re-run reopened this operation (``core.reopen``)."""
        rec = self.record
        return (rec.extra or {}).get(RERUN_BASE, 0) if rec is not None else 0


def open_operation(ctx: DurableContextProtocol, op_id: str, op_type: str, sub_type: str,
                   name: str | None) -> Opening:
    """Ask the store about operation ``op_id`` of ``ctx``; raise if it holds a different operation there."""
    parent_id = ctx.record_parent
    rec = ctx.state.lookup(parent_id, op_id)
    if rec is not None:
        diff = identity_mismatch(rec, op_type, sub_type, name, parent_id)
        if diff:
            raise NonDeterministicExecutionError(
                f"Non-deterministic operation identity at id={op_id!r}: {diff}", step_id=op_id
            )
    return Opening(ctx.state, op_id, parent_id, op_type, sub_type, name, rec)


def is_replayed(state: ContextState, parent_id: str, op_id: str) -> bool:
    """Whether operation ``op_id`` has a terminal record (it will replay, not run)."""
    rec = state.lookup(parent_id, op_id)
    return rec is not None and rec.is_terminal


# -- the items of a batch ----------------------------------------------------------------------
def item_records(state: ContextState, batch_op_id: str, n: int) -> dict[int, Any]:
    """The records of items ``0 .. n-1`` of a batch (records or their bytes)."""
    records = state.branch_records(batch_op_id, n)
    if records and max(records) >= n:  # items past the end (a shorter re-run): not this batch's
        records = {i: r for i, r in records.items() if i < n}
    return records


def resumed_items(state: ContextState, batch_op_id: str,
                  n: int) -> tuple[dict[int, Any], dict[int, bool], dict[int, Any]]:
    """``split_terminal`` of a resumed batch's item records; plain successes stay in the store.

    A resumed million-item map only needs to know which items are done before it
    dispatches the rest: their records are ``IN_STORE`` until the BatchResult is built.
    """
    outcomes = state.branch_outcomes(batch_op_id, COMPACT_ITEM)
    if outcomes is None:  # a state without a store of its own (a worker's nested batch)
        return split_terminal(item_records(state, batch_op_id, n))
    plain, others = outcomes
    if plain and max(plain) >= n:  # items past the end (a shorter re-run): not this batch's
        plain = [i for i in plain if i < n]
    if others and max(others) >= n:
        others = {i: r for i, r in others.items() if i < n}
    done, done_ok, unfinished = split_terminal(others)
    done.update(dict.fromkeys(plain, IN_STORE))
    done_ok.update(dict.fromkeys(plain, True))
    return done, done_ok, unfinished


__all__ = ["Opening", "build_error", "error_class", "is_replayed", "item_records", "open_operation", "raise_stored",
           "resumed_items"]
