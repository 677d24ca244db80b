"""Run one branch body (a parallel function or a map item) and turn its outcome into a record.

Shared by the worker's task loop and the in-worker thread runner for nested batches, so a
branch is recorded the same way wherever it runs.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from durable_mp import serdes as _serdes
from durable_mp.core.nesting import branch_record_parent
from durable_mp.core.records import ItemEncoder, OpRecord, OpStatus, OpType, branch_id_bytes, item_prefix, operation_id
from durable_mp.core.text import safe_str
from durable_mp.core.vocabulary import default_item_name, map_item_name
from durable_mp.engine import result_blobs
from durable_mp.engine import state as _state
from durable_mp.engine.protocol import NOT_SENT
from durable_mp.engine.state import take_slept_seconds
from durable_mp.exceptions import OrphanedChildException, UnrecoverableError
from durable_mp.lambda_service import ErrorObject


class BranchSource:
    """Where a batch's branch bodies come from: one function per branch, or func + inputs."""

    __slots__ = ("funcs", "func", "inputs", "item_serdes", "batch_op_id", "item_sub_type", "names", "execution_id",
                 "flat")

    def __init__(self, *, funcs: Sequence[Callable[..., Any]] | None, func: Callable[..., Any] | None,
                 inputs: Sequence[Any] | None,
                 item_serdes: Any, batch_op_id: str, item_sub_type: str, names: Any, execution_id: str,
                 flat: bool = False) -> None:
        self.funcs = funcs
        self.func = func
        self.inputs = inputs
        self.item_serdes = item_serdes
        self.batch_op_id = batch_op_id
        self.item_sub_type = item_sub_type
        self.names = names  # list, dict {index: name} or None
        self.execution_id = execution_id
        self.flat = flat  # branches run in virtual contexts: their operations' parent is the batch

    def name(self, index: int) -> str:
        if self.names is not None:
            got = self.names[index] if not isinstance(self.names, dict) else self.names.get(index)
            if got is not None:
                return safe_str(got)
        return default_item_name(index, parallel=self.funcs is not None)

    def call(self, ctx: Any, index: int) -> Any:
        if self.funcs is not None:
            return self.funcs[index](ctx)
        assert self.func is not None and self.inputs is not None
        return self.func(ctx, self.inputs[index], index, self.inputs)


def run_branch(source: BranchSource, index: int, make_context: Callable[[str, str | None], Any]) -> OpRecord:
    """Execute branch ``index`` and return its terminal record (SUCCEEDED or FAILED)."""
    rec: OpRecord = BranchRunner(source, make_context, compact=False).run(index)[0]
    return rec


# serdes for which a scalar's decoded payload is the scalar itself
_PLAIN_SERDES = (type(None), _serdes.DefaultSerDes, _serdes.PickleSerDes)
_SCALARS = frozenset({int, str, float, bool, type(None)})  # immutable: the value itself can travel too
_COMPACT_MAX_BYTES = 64 * 1024  # larger results keep their own frame on the wire (``wire.big``)
_COMPACT_NAME_BYTES = 0xFFFF  # the compact record keeps a name's UTF-8 length in 16 bits
_MAP_ITEM = map_item_name(0)[:-1].encode()  # b"map-item-": a default map item's name before its index
_time = time.time
SLEPT_KEY = "slept"  # in a branch record's extra: seconds it slept under skip_time (its virtual duration)


def slept_seconds(rec: OpRecord) -> float:
    """Seconds the branch of ``rec`` slept under skip_time (0: none, or the real clock)."""
    return float((rec.extra or {}).get(SLEPT_KEY, 0.0))


class BranchRunner:
    """Runs a batch's branches one index at a time, turning each outcome into a record.

    Built once per chunk, so what is the same for every item (the function, the id
    prefix, the serdes check, the compact record's constant parts) is looked up once:
    a map over a million tiny items spends most of its time here.

    With ``compact=True``, ``run`` returns a plain success with a small result as compact
    record bytes (``core.records.item_record``) and, if it is an immutable scalar under a
    pickle-compatible serdes, its value (else ``NOT_SENT``).  Every other outcome is an
    ``OpRecord`` (and ``None``).
    """

    __slots__ = ("source", "make_context", "compact", "id_prefix", "parent", "sub_type", "pid",
                 "default_serdes", "plain_values", "func", "inputs", "record_parent", "encoder", "sink")

    def __init__(self, source: BranchSource, make_context: Callable[[str, str | None], Any], *,
                 compact: bool) -> None:
        self.source = source
        self.make_context = make_context
        self.compact = compact
        # operation_id's input, ``f"{parent}-{index}"``, without formatting the parent each time
        self.id_prefix = f"{source.batch_op_id}-".encode() if source.batch_op_id else None
        self.parent, self.sub_type = item_prefix(source.batch_op_id, source.item_sub_type)
        self.encoder = ItemEncoder(self.parent, self.sub_type)
        self.pid = _pid()
        serdes_class = source.item_serdes.__class__
        self.default_serdes = serdes_class is type(None) or serdes_class is _serdes.DefaultSerDes
        self.plain_values = serdes_class in _PLAIN_SERDES
        self.func = source.func if source.funcs is None and source.names is None else None
        self.inputs = source.inputs
        self.record_parent = branch_record_parent(source.batch_op_id, source.flat)
        # a large plain success is written to the store by this worker (engine.result_blobs)
        self.sink = result_blobs.sink_for(source.execution_id) if compact and self.plain_values else None

    def run(self, index: int) -> tuple[Any, Any]:
        """Execute branch ``index``: ``(record, value)`` (see the class docstring)."""
        source = self.source
        digits = b"%d" % index
        if self.id_prefix is not None:
            op = branch_id_bytes(self.id_prefix + digits)
            op_id = op.decode()
        else:
            op_id = operation_id(source.batch_op_id, index)
            op = op_id.encode()
        func = self.func
        # a default map item's name is only needed as UTF-8: ``map_item_name(index)`` (a test pins the two)
        name = None if func is not None else source.name(index)
        start = _time()
        if _state.slept_anywhere:
            take_slept_seconds()  # a fresh count for this branch
        try:
            context = self.make_context(op_id, self.record_parent)
            if func is not None:
                value = func(context, self.inputs[index], index, self.inputs)  # type: ignore[index]
            else:
                value = source.call(context, index)
            text = _serdes.envelope_of(value) if self.default_serdes else None
            to_sink = False  # written by this worker into the store (engine.result_blobs), not sent
            if text is not None and len(text) <= _COMPACT_MAX_BYTES:
                payload: Any = text
            else:
                text = None
                payload = _serdes.serialize_parts(source.item_serdes, value, op_id=op_id,
                                                  execution_id=source.execution_id,
                                                  what=f"result of branch {index} ({_named(name, index)})")
                to_sink = self.sink is not None and self.sink.takes(payload)
                if isinstance(payload, list) and not to_sink:
                    payload = snapshot(payload)  # serdes.Parts (a numpy result): copy what may still change
        except OrphanedChildException:
            raise
        except UnrecoverableError as exc:  # non-determinism & co. end the execution, not just the branch
            return self._record(op_id, _named(name, index), start, OpStatus.FAILED, exc=exc,
                                extra={"fatal": True, "raise": type(exc).__name__}), None
        except BaseException as exc:  # noqa: BLE001 - SystemExit in a branch fails that branch only, and so does
            # KeyboardInterrupt: branches run in worker processes, whose SIGINT kills them
            # (worker_process.default_signals), so one raised here was raised by the user's code
            return self._record(op_id, _named(name, index), start, OpStatus.FAILED, exc=exc), None
        slept = take_slept_seconds() if _state.slept_anywhere else 0.0
        if slept:  # skip_time: the batch's virtual clock orders the outcome by it; only a full record keeps it
            return self._record(op_id, _named(name, index), start, OpStatus.SUCCEEDED,
                                snapshot(payload) if to_sink else payload, extra={SLEPT_KEY: slept}), None
        if to_sink:  # written now, as the value was when returned
            assert self.sink is not None
            rec = self._record(op_id, _named(name, index), start, OpStatus.SUCCEEDED, payload)
            written = self.sink.write(rec)
            if written is not None:
                return written, None
            payload = snapshot(payload)  # the write failed: through the pipe after all
        if self.compact:
            try:
                label = _MAP_ITEM + digits if name is None else name.encode()
                if len(label) > _COMPACT_NAME_BYTES:
                    raise struct.error("the name is too long for a compact record")
                if text is not None:  # the usual map result: JSON text of a scalar
                    data = self.encoder.text(op, label, start, _time(), self.pid, text)
                elif payload is None or (payload.__class__ is not list and len(payload) <= _COMPACT_MAX_BYTES):
                    data = self.encoder.record(op, label, start, _time(), self.pid, payload)
                else:
                    data = None
            except (struct.error, UnicodeEncodeError):  # a name that is not UTF-8 or too long: the full record
                data = None
            if data is not None:
                return data, value if value.__class__ in _SCALARS and self.plain_values else NOT_SENT
        return self._record(op_id, _named(name, index), start, OpStatus.SUCCEEDED, payload), None

    def _record(self, op_id: str, name: str, start: float, status: str, payload: Any = None,
                exc: BaseException | None = None, extra: dict[str, Any] | None = None) -> OpRecord:
        source = self.source
        error = None if exc is None else _error_of(exc)
        if status == OpStatus.FAILED:
            slept = take_slept_seconds()
            if slept:
                extra = {**(extra or {}), SLEPT_KEY: slept}
        return OpRecord(op_id, source.batch_op_id, OpType.CONTEXT, source.item_sub_type, name, status,
                        start, time.time(), payload, error, 1, pid=self.pid, extra=extra)


def _named(name: str | None, index: int) -> str:
    """A branch's name: its own, or (None) a map item's default."""
    return map_item_name(index) if name is None else name


_ENGINE_ERROR = "durable_mp.exceptions.DurableExecutionsError"


def _error_of(exc: BaseException) -> dict[str, Any]:
    """The checkpointed error of a failed branch, whatever the user's exception does when looked at.

    ``ErrorObject.from_exception`` does not raise for a broken ``__str__``; this is the
    last line for anything else (a traceback that cannot be walked): a branch whose failure
    cannot be recorded must still end, or its batch waits for it forever.
    """
    try:
        return ErrorObject.from_exception(_from_user_code(exc)).to_dict()
    except Exception as error:  # noqa: BLE001
        cls = type(exc)
        return ErrorObject(f"the branch raised {cls.__module__}.{cls.__qualname__}, which could not be recorded: "
                           f"{type(error).__name__}: {safe_str(error)}", _ENGINE_ERROR).to_dict()


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


def failed_record(source: BranchSource, index: int, start: float, exc: BaseException) -> OpRecord:
    """Record of a branch whose run raised past ``BranchRunner.run`` (an engine fault, not the user's)."""
    return OpRecord(operation_id(source.batch_op_id, index), source.batch_op_id, OpType.CONTEXT,
                    source.item_sub_type, source.name(index), OpStatus.FAILED, start, time.time(),
                    error=_error_of(exc))


def started_record(source_op_id: str, item_sub_type: str, name: str, index: int, start: float) -> OpRecord:
    """Record of a branch that was running when its batch completed early."""
    return OpRecord(operation_id(source_op_id, index), source_op_id, OpType.CONTEXT, item_sub_type, name,
                    OpStatus.STARTED, start)


_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


def _pid() -> int:
    """This process's pid, cached: getpid() is a syscall and runs once per branch."""
    return _PID[0]
