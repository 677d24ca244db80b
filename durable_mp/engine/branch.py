"""Run one branch body (a parallel function or a map item) and turn its outcome into a record.

Shared by the worker's task loop and the in-worker thread runner for nested batches, so a
branch is recorded the same way wherever it runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from durable_mp import serdes as _serdes
from durable_mp.core.records import OpRecord, OpStatus, OpType, item_record, operation_id
from durable_mp.engine.protocol import NOT_SENT
from durable_mp.engine.state import take_skipped_seconds
from durable_mp.exceptions import OrphanedChildException, UnrecoverableError
from durable_mp.lambda_service import ErrorObject

SKIPPED_KEY = "skipped"  # in a branch record's extra: seconds of delay it skipped under skip_time


class BranchSource:
    """Where a batch's branch bodies come from: one function per branch, or func + inputs."""

    __slots__ = ("funcs", "func", "inputs", "item_serdes", "batch_op_id", "item_sub_type", "names", "execution_id")

    def __init__(self, *, funcs: Sequence[Callable[..., Any]] | None, func: Callable[..., Any] | None,
                 inputs: Sequence[Any] | None,
                 item_serdes: Any, batch_op_id: str, item_sub_type: str, names: Any, execution_id: str) -> None:
        self.funcs = funcs
        self.func = func
        self.inputs = inputs
        self.item_serdes = item_serdes
        self.batch_op_id = batch_op_id
        self.item_sub_type = item_sub_type
        self.names = names  # list, dict {index: name} or None
        self.execution_id = execution_id

    def name(self, index: int) -> str:
        if self.names is not None:
            got = self.names[index] if not isinstance(self.names, dict) else self.names.get(index)
            if got is not None:
                return str(got)
        return f"map-item-{index}" if self.funcs is None else f"parallel-branch-{index}"

    def call(self, ctx: Any, index: int) -> Any:
        if self.funcs is not None:
            return self.funcs[index](ctx)
        assert self.func is not None and self.inputs is not None
        return self.func(ctx, self.inputs[index], index, self.inputs)


def run_branch(source: BranchSource, index: int, make_context: Callable[[str], Any]) -> OpRecord:
    """Execute branch ``index`` and return its terminal record (SUCCEEDED or FAILED)."""
    rec: OpRecord = run_branch_compact(source, index, make_context, None)[0]
    return rec


# serdes for which a scalar's decoded payload is the scalar itself
_PLAIN_SERDES = (type(None), _serdes.DefaultSerDes, _serdes.PickleSerDes)
_SCALARS = frozenset({int, str, float, bool, type(None)})  # immutable: the value itself can travel too
_COMPACT_MAX_BYTES = 64 * 1024  # larger results keep their own frame on the wire (``wire.big``)


def run_branch_compact(source: BranchSource, index: int, make_context: Callable[[str], Any],
                       compact: tuple[bytes, bytes, int] | None) -> tuple[Any, Any]:
    """Execute branch ``index``: ``(record, value)``.

    With ``compact = (parent, sub_type, pid)`` (``core.records.item_prefix`` + this
    process's pid), a plain success with a small result comes back as compact record
    bytes and, if it is an immutable scalar, its value (else ``NOT_SENT``).  Every other
    outcome is an ``OpRecord`` (and ``None``), exactly as ``run_branch`` returns it.
    """
    op_id = operation_id(source.batch_op_id, index)
    name = source.name(index)
    start = time.time()
    take_skipped_seconds()  # a fresh count for this branch

    def record(status: str, payload: Any = None, exc: BaseException | None = None,
               extra: dict[str, Any] | None = None) -> OpRecord:
        error = None if exc is None else ErrorObject.from_exception(_from_user_code(exc)).to_dict()
        skipped = take_skipped_seconds()  # under skip_time: the policy orders outcomes by it
        if skipped:
            extra = {**(extra or {}), SKIPPED_KEY: skipped}
        rec: OpRecord = OpRecord(op_id, source.batch_op_id, OpType.CONTEXT, source.item_sub_type, name, status,
                                 start, time.time(), payload, error, 1, pid=_pid(), extra=extra)
        return rec

    try:
        value = source.call(make_context(op_id), index)
        payload = _serdes.serialize_parts(source.item_serdes, value, op_id=op_id,
                                          execution_id=source.execution_id,
                                          what=f"result of branch {index} ({name})")
        if isinstance(payload, list):  # serdes.Parts (a numpy result): copy what may still change
            payload = snapshot(payload)
    except (KeyboardInterrupt, OrphanedChildException):
        raise
    except UnrecoverableError as exc:  # non-determinism & co. end the execution, not just the branch
        return record(OpStatus.FAILED, exc=exc, extra={"fatal": True, "raise": type(exc).__name__}), None
    except BaseException as exc:  # noqa: BLE001 - SystemExit in a branch fails that branch only
        return record(OpStatus.FAILED, exc=exc), None
    if compact is not None and payload.__class__ is not list and (payload is None
                                                                  or len(payload) <= _COMPACT_MAX_BYTES):
        end = time.time()
        skipped = take_skipped_seconds()
        if not skipped:
            parent, sub_type, pid = compact
            plain = value.__class__ in _SCALARS and source.item_serdes.__class__ in _PLAIN_SERDES
            return (item_record(op_id, parent, sub_type, name, start, end, pid, payload),
                    value if plain else NOT_SENT)
        # under skip_time the policy orders outcomes by the seconds they skipped: an OpRecord keeps them
        return record(OpStatus.SUCCEEDED, payload, extra={SKIPPED_KEY: skipped}), None
    return record(OpStatus.SUCCEEDED, payload), None


def _from_user_code(exc: BaseException) -> BaseException:
    """The exception with this module's own frames (``run_branch``, ``BranchSource.call``) left out.

    A branch's stored traceback is read by people looking for their failing line; the
    engine's frames above it say nothing.  If every frame is ours, nothing is left out.
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return exc.with_traceback(tb) if tb is not None else exc


class FatalBranchError(Exception):
    """A branch failed with an error that must end the execution, not just the branch (reference §5).

    The engine raises it with the branch's record; the operation layer rebuilds the
    original error (``NonDeterministicExecutionError`` & co.) from it.
    """

    def __init__(self, record: OpRecord) -> None:
        super().__init__(f"branch {record.name!r} failed fatally")
        self.record = record


def raise_if_fatal(rec: OpRecord) -> None:
    """Raise ``FatalBranchError`` for a record whose error must escape its batch."""
    extra = rec.extra
    if extra and extra.get("fatal"):
        raise FatalBranchError(rec)


def snapshot(parts: Any) -> Any:
    """A result's bytes as of now: buffers that may still change are copied.

    Only ``bytes`` are immutable; a result that travels out of band from a numpy array's
    memory would otherwise carry whatever the array holds when it is finally sent (a map
    function that reuses one output buffer).
    """
    if not isinstance(parts, list):  # bytes, a serdes' str, None: immutable
        return parts
    return [part if part.__class__ is bytes else bytes(part) for part in parts]


def started_record(source_op_id: str, item_sub_type: str, name: str, index: int, start: float) -> OpRecord:
    """Record of a branch that was running when its batch completed early."""
    return OpRecord(operation_id(source_op_id, index), source_op_id, OpType.CONTEXT, item_sub_type, name,
                    OpStatus.STARTED, start)


_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


def _pid() -> int:
    """This process's pid, cached: getpid() is a syscall and runs once per branch."""
    return _PID[0]
