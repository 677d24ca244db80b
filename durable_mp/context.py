"""``DurableContext``: the handler's view of a durable execution.

A context owns a position in the operation tree (its own operation id, ``""`` at the
root) and a per-context counter that names its operations deterministically.  Every
operation first looks for its checkpoint; a terminal one is returned (or re-raised)
without running user code.  How work is recorded and where branches run is the job of
the *state* behind the context: ``DriverState`` (driver process, process pool) or
``WorkerState`` (inside a worker, threads for nested batches).  The context itself is
identical in both places, which is what makes replay inside a re-dispatched branch work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from durable_mp import serdes as _serdes
from durable_mp.concurrency.models import BatchItemStatus, BatchResult, CompletionPolicy, CompletionReason, ItemColumns
from durable_mp.config import (
    ChildConfig,
    Duration,
    MapConfig,
    NestingType,
    ParallelBranch,
    ParallelConfig,
    StepConfig,
    timeout_seconds,
)
from durable_mp.core.item_probe import split_terminal
from durable_mp.core.records import OpRecord, OpStatus, OpType, identity_mismatch, operation_id
from durable_mp.core.spec import BatchSpec

# The reference defines the decorators in ``context``: re-exported from ``decorators``.
from durable_mp.decorators import durable_parallel_branch as durable_parallel_branch
from durable_mp.decorators import durable_step as durable_step
from durable_mp.decorators import durable_wait_for_callback as durable_wait_for_callback
from durable_mp.decorators import durable_with_child_context as durable_with_child_context
from durable_mp.engine.branch import FatalBranchError
from durable_mp.engine.result_decode import COMPACT_ITEM, IN_STORE, UNREAD, fast_decodable, success_value
from durable_mp.engine.state import register_context_factory
from durable_mp.exceptions import (
    ChildContextError,
    NonDeterministicExecutionError,
    SerDesError,
    ValidationError,
)
from durable_mp.lambda_service import ErrorObject
from durable_mp.logger import Logger
from durable_mp.operation.naming import op_name
from durable_mp.operation.replay import build_error, raise_stored
from durable_mp.operation.signature import check_branch, check_child, check_map, check_step
from durable_mp.operation.step import run_step

# The reference's examples import these from ``context``: re-exported from ``types``.
from durable_mp.types import StepContext as StepContext
from durable_mp.types import WaitForCallbackContext as WaitForCallbackContext
from durable_mp.waits import WaitForConditionConfig

T = TypeVar("T")
U = TypeVar("U")

SUB_STEP = "Step"
SUB_WAIT = "Wait"
SUB_CHILD = "RunInChildContext"
SUB_PARALLEL = "Parallel"
SUB_PARALLEL_BRANCH = "ParallelBranch"
SUB_MAP = "Map"
# In a batch record's extra: FLAT branches are still recorded (their results are the
# items' checkpoints), but views show their operations as the batch's own children.
NESTING_KEY = "nesting"
SUB_MAP_ITERATION = "MapIteration"
SUB_WAIT_FOR_CONDITION = "WaitForCondition"


class DetachedContext:
    """A parent's context seen from a branch in another process: its logger, no operations."""

    def __init__(self, execution_id: str, op_id: str) -> None:
        self.execution_id = execution_id
        self.operation_id = op_id
        self.logger = Logger(extra={"executionArn": execution_id, "parentId": op_id or None})

    def __getattr__(self, name: str) -> Any:
        raise ValidationError(
            f"DurableContext.{name} of an enclosing context was used inside a branch, which runs in "
            f"another process: use the context the branch function receives")


class DurableContext:
    """Entry point of every durable operation inside a handler or branch."""

    def __init__(self, state: Any, op_id: str = "", *, logger: Logger | None = None,
                 parent_id: str | None = None) -> None:
        self.state = state
        self._op_id = op_id  # prefix of this context's operation ids
        # parent_id of this context's records: its own id, or a virtual context's enclosing one
        self._parent_id = op_id if parent_id is None else parent_id
        self._counter = 0
        self.is_virtual = False
        self._parent_logger = logger
        self._logger: Logger | None = None

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        """A branch function that closes over its parent's context travels with a stand-in.

        The reference's branches are threads and may use the parent's ``logger``; here they
        run in other processes, where only the logger can work (module ``DetachedContext``).
        """
        return DetachedContext, (self.state.execution_id, self._op_id)

    @property
    def logger(self) -> Logger:
        """Replay-aware logger; built on first use (a map item rarely logs)."""
        if self._logger is None:
            base = self._parent_logger or Logger(extra={"executionArn": self.state.execution_id})
            self._logger = base.with_extra(parentId=self._op_id or None)
            self._logger._is_replaying = self.is_replaying
        return self._logger

    # -- identity ---------------------------------------------------------------------------
    @property
    def operation_id(self) -> str:
        return self._op_id

    @property
    def record_parent(self) -> str:
        """``parent_id`` of the operations this context records (virtual contexts have none)."""
        return self._parent_id

    @property
    def execution_context(self) -> Any:
        return _ExecutionContext(self.state.execution_id)

    def _next_id(self) -> str:
        self._counter += 1
        return operation_id(self._op_id, self._counter)

    def _checkpoint(self, op_id: str, op_type: str, sub_type: str, name: str | None) -> OpRecord | None:
        rec = self.state.lookup(self._parent_id, op_id)
        if rec is not None:
            diff = identity_mismatch(rec, op_type, sub_type, name, self._parent_id)
            if diff:
                raise NonDeterministicExecutionError(
                    f"Non-deterministic operation identity at id={op_id!r}: {diff}", step_id=op_id
                )
        return rec

    def is_replaying(self) -> bool:
        """True while the next operation of this context has a terminal checkpoint."""
        rec = self.state.lookup(self._parent_id, operation_id(self._op_id, self._counter + 1))
        return rec is not None and rec.is_terminal

    def create_child_context(self, operation_id: str, *, is_virtual: bool = False) -> DurableContext:
        child = DurableContext(self.state, operation_id, logger=self.logger,
                               parent_id=self._parent_id if is_virtual else None)
        child.is_virtual = is_virtual
        return child

    def set_logger(self, new_logger: Any) -> None:
        self.logger.set_logger(new_logger)

    # -- operations -------------------------------------------------------------------------
    def step(self, func: Callable[..., T], name: str | None = None, config: StepConfig | None = None) -> T:
        """Run ``func(StepContext)`` once, checkpoint its result, retry by the strategy."""
        config = config or StepConfig()
        check_step(func)  # before anything is recorded: a wrong signature is not retried
        name = op_name(func, name)
        op_id = self._next_id()
        rec = self._checkpoint(op_id, OpType.STEP, config.sub_type or SUB_STEP, name)
        if rec is not None and rec.is_terminal:
            return self._replayed(rec, config.serdes, f"result of step {name!r}", "StepError")
        return run_step(self, op_id, name, func, config, rec)

    def run_in_child_context(
        self, func: Callable[[DurableContext], T], name: str | None = None, config: ChildConfig | None = None
    ) -> T:
        """Run ``func(child_context)``; its operations are grouped (and replayed) under one op."""
        config = config or ChildConfig()
        check_child(func)
        name = op_name(func, name) if name is None else name
        op_id = self._next_id()
        child = self.create_child_context(op_id, is_virtual=config.is_virtual)
        if config.is_virtual:
            return func(child)
        sub_type = config.sub_type or SUB_CHILD
        rec = self._checkpoint(op_id, OpType.CONTEXT, sub_type, name)
        what = f"result of child context {name!r}"
        if rec is not None and rec.is_terminal:
            return self._replayed(rec, config.serdes, what, "ChildContextError")
        base = rec or OpRecord(op_id, self._parent_id, OpType.CONTEXT, sub_type, name, OpStatus.STARTED, time.time())
        if rec is None:
            self.state.emit(base)
        try:
            value = func(child)
        except Exception as exc:  # noqa: BLE001 - every user error becomes a FAILED context
            err = ErrorObject.from_exception(exc)
            self.state.emit(base._replace(status=OpStatus.FAILED, end_ts=time.time(), error=err.to_dict()))
            raise ChildContextError(err.message, err.type, err.data, err.stack_trace) from err.to_exception()
        payload = _serdes.serialize(config.serdes, value, op_id=op_id, execution_id=self.state.execution_id, what=what)
        self.state.emit(base._replace(status=OpStatus.SUCCEEDED, end_ts=time.time(), result=payload))
        return _serdes.deserialize(config.serdes, payload, op_id=op_id, execution_id=self.state.execution_id, what=what)

    def parallel(
        self,
        functions: Sequence[Callable[[DurableContext], T]],
        name: str | None = None,
        config: ParallelConfig | None = None,
    ) -> BatchResult[T]:
        """Run each function in its own branch (a worker process at the top level)."""
        config = config or ParallelConfig()
        funcs, names = [], []
        for i, f in enumerate(functions):
            if isinstance(f, ParallelBranch):
                funcs.append(f.func)
                names.append(f.name or f"parallel-branch-{i}")
            elif callable(f):
                funcs.append(f)
                names.append(f"parallel-branch-{i}")
            else:
                raise ValidationError(f"parallel branch {i} is not callable: {type(f).__name__}")
            check_branch(funcs[-1], i)
        return self._batch(SUB_PARALLEL, SUB_PARALLEL_BRANCH, name, config, len(funcs), names, funcs=funcs)

    def map(
        self,
        inputs: Sequence[U],
        func: Callable[[DurableContext, U, int, Sequence[U]], T],
        name: str | None = None,
        config: MapConfig | None = None,
    ) -> BatchResult[T]:
        """Call ``func(ctx, item, index, inputs)`` for every item, each checkpointed on its own."""
        config = config or MapConfig()
        check_map(func)  # before anything is dispatched: a wrong signature would fail every item
        inputs = inputs if isinstance(inputs, (list, tuple)) else list(inputs)
        name = name if name is not None else getattr(func, "_original_name", None)
        names = None
        if config.item_namer is not None:
            names = [config.item_namer(item, i) for i, item in enumerate(inputs)]
        return self._batch(SUB_MAP, SUB_MAP_ITERATION, name, config, len(inputs), names, func=func, inputs=inputs)

    def _batch(self, sub_type, item_sub_type, name, config, n, names, *, funcs=None, func=None, inputs=None):
        op_id = self._next_id()
        rec = self._checkpoint(op_id, OpType.CONTEXT, sub_type, name)
        # ValidationError before any checkpoint
        policy = CompletionPolicy(config.completion_config, n)
        if config.max_concurrency is not None and config.max_concurrency < 1:
            raise ValidationError(f"max_concurrency must be >= 1, got {config.max_concurrency}")
        item_serdes = config.item_serdes or config.serdes
        if rec is not None and rec.is_terminal:
            reason = CompletionReason(rec.extra["completion_reason"])
            records = self._child_records(op_id, n)
            return self._batch_result(records, reason, item_serdes, n)
        base = rec or OpRecord(op_id, self._parent_id, OpType.CONTEXT, sub_type, name, OpStatus.STARTED, time.time())
        if rec is None:
            self.state.emit(base)
            done: dict[int, Any] = {}
            done_ok: dict[int, bool] = {}
            unfinished: dict[int, Any] = {}
        else:
            done, done_ok, unfinished = self._replayed_items(op_id, n)
        spec = BatchSpec(
            op_id=op_id,
            sub_type=sub_type,
            item_sub_type=item_sub_type,
            name=name,
            n=n,
            names=names,
            funcs=funcs,
            func=func,
            inputs=inputs,
            item_serdes=item_serdes,
            max_concurrency=config.max_concurrency,
            branch_timeout=timeout_seconds(getattr(config, "branch_timeout", None)),
            policy=policy,
            done=done,
            resuming=rec is not None,
            unfinished=unfinished,
            done_ok=done_ok,
            execution_id=self.state.execution_id,
            skip_time=bool(self.state.skip_time),
        )
        try:
            records, reason = self.state.run_batch(spec)
        except FatalBranchError as fatal:  # non-determinism & co. in a branch end the execution
            rec = fatal.record
            cls_name = (rec.extra or {}).get("raise", "ExecutionError")
            error = build_error(ErrorObject.from_dict(rec.error or {}), cls_name)
            raise error from None
        self.state.emit(
            base._replace(
                status=OpStatus.SUCCEEDED,
                end_ts=time.time(),
                extra={"completion_reason": reason.value, "total": n, "reported": len(records),
                       **({NESTING_KEY: NestingType.FLAT.value} if config.nesting_type is NestingType.FLAT else {})},
            )
        )
        return self._batch_result(records, reason, item_serdes, n, op_id)

    def _replayed_items(self, op_id: str, n: int) -> tuple[dict[int, Any], dict[int, bool], dict[int, Any]]:
        """``split_terminal`` of a resumed batch's item records; plain successes stay in the store.

        A resumed million-item map only needs to know which items are done before it
        dispatches the rest: their records are ``IN_STORE`` until the BatchResult is built.
        """
        outcomes = getattr(self.state, "branch_outcomes", None)
        if outcomes is None:  # a state without a store of its own (a worker's nested batch)
            return split_terminal(self._child_records(op_id, n))
        plain, others = outcomes(op_id, COMPACT_ITEM)
        if plain and max(plain) >= n:  # items past the end (a shorter re-run): not this batch's
            plain = [i for i in plain if i < n]
        if others and max(others) >= n:
            others = {i: r for i, r in others.items() if i < n}
        done, done_ok, unfinished = split_terminal(others)
        done.update(dict.fromkeys(plain, IN_STORE))
        done_ok.update(dict.fromkeys(plain, True))
        return done, done_ok, unfinished

    def _child_records(self, batch_op_id: str, n: int) -> dict[int, Any]:
        records = self.state.branch_records(batch_op_id, n)
        if records and max(records) >= n:  # items past the end (a shorter re-run): not this batch's
            records = {i: r for i, r in records.items() if i < n}
        return records

    def _batch_result(self, records: Any, reason: CompletionReason, item_serdes, n: int,
                      op_id: str | None = None) -> BatchResult:
        """The BatchResult on columns: records not decoded yet (bytes, ``OpRecord``) are decoded here."""
        columns = records if isinstance(records, ItemColumns) else ItemColumns.of(records, n)
        exec_id = self.state.execution_id
        raw = columns.raw
        if raw and op_id is not None:
            self._read_in_store(columns, op_id, fast_decodable(item_serdes))
        if raw and fast_decodable(item_serdes):
            self._decode_compact(columns)
        for index in sorted(raw):
            r = raw[index]
            if not isinstance(r, OpRecord):  # a worker's record bytes (or buffer)
                r = OpRecord.loads(r)
            if r.status == OpStatus.SUCCEEDED:
                try:
                    value = _serdes.deserialize(item_serdes, r.result, op_id=r.op_id, execution_id=exec_id,
                                                what=f"result of branch {index} ({r.name})")
                except SerDesError as exc:  # the branch ran; only its result is unreadable here
                    columns.set_item(index, BatchItemStatus.FAILED, None, ErrorObject.from_exception(exc))
                    continue
                columns.set_item(index, BatchItemStatus.SUCCEEDED, value)
            elif r.status == OpStatus.FAILED:
                columns.set_item(index, BatchItemStatus.FAILED, None, ErrorObject.from_dict(r.error))
            else:
                columns.set_item(index, BatchItemStatus.STARTED)
        return BatchResult.of_columns(columns, reason)

    def _read_in_store(self, columns: ItemColumns, op_id: str, fast: bool) -> None:
        """The records ``_replayed_items`` left in the store, read in one pass and decoded as they come."""
        raw = columns.raw
        waiting = [index for index, r in raw.items() if r is IN_STORE]
        if not waiting:
            return
        waiting.sort()
        indices: list[int] = []
        values: list[Any] = []

        def take(index: int, data: Any) -> None:
            if data is None:
                raise NonDeterministicExecutionError(f"the record of item {index} of batch {op_id} disappeared")
            value = success_value(data) if fast else UNREAD
            if value is UNREAD:  # the general path decodes it (and reports what it cannot)
                raw[index] = data
            else:
                del raw[index]
                indices.append(index)
                values.append(value)

        self.state.branch_each(op_id, waiting, take)
        columns.set_values(indices, values)

    @staticmethod
    def _decode_compact(columns: ItemColumns) -> None:
        """Compact item records (plain successes) of a default serdes: values decoded straight from the bytes."""
        raw = columns.raw
        indices, values = [], []
        for index in sorted(raw):
            data = raw[index]
            if data.__class__ is bytes and data[0] == COMPACT_ITEM:
                value = success_value(data)
                if value is not UNREAD:
                    del raw[index]
                    indices.append(index)
                    values.append(value)
        columns.set_values(indices, values)

    def wait(self, duration: Duration, name: str | None = None) -> None:
        """Sleep durably: a resumed execution only waits for what is left."""
        seconds = duration.to_seconds() if isinstance(duration, Duration) else duration
        if seconds < 1:
            raise ValidationError(f"wait duration must be at least 1 second, got {seconds}")
        op_id = self._next_id()
        rec = self._checkpoint(op_id, OpType.WAIT, SUB_WAIT, name)
        if rec is not None and rec.is_terminal:
            return None
        if rec is None:
            now = time.time()
            rec = OpRecord(op_id, self._parent_id, OpType.WAIT, SUB_WAIT, name, OpStatus.STARTED, now,
                           extra={"scheduled_end": now + seconds})
            self.state.emit(rec)
        self.state.sleep_until(rec.extra["scheduled_end"])
        self.state.emit(rec._replace(status=OpStatus.SUCCEEDED, end_ts=time.time()))
        return None

    def wait_for_condition(
        self, check: Callable[[T, Any], T], config: WaitForConditionConfig, name: str | None = None
    ) -> T:
        """Poll ``check(state, ctx)`` until the wait strategy stops; each poll is checkpointed."""
        from durable_mp.operation.wait_for_condition import run_wait_for_condition

        return run_wait_for_condition(self, check, config, name)

    def create_callback(self, name: str | None = None, config: Any = None) -> Any:
        """A callback another process completes (``durable_mp.operation.callback.send_callback_success``)."""
        from durable_mp.operation.callback import create_callback

        return create_callback(self, name, config)

    def wait_for_callback(self, submitter: Callable[[str, Any], None], name: str | None = None,
                          config: Any = None) -> Any:
        """Create a callback, hand its id to ``submitter`` (a step), and wait for the result."""
        from durable_mp.operation.callback import wait_for_callback

        return wait_for_callback(self, submitter, name, config)

    # -- replay helpers ---------------------------------------------------------------------
    def _replayed(self, rec: OpRecord, serdes: Any, what: str, error_cls: str) -> Any:
        if rec.status == OpStatus.SUCCEEDED:
            return _serdes.deserialize(serdes, rec.result, op_id=rec.op_id, execution_id=self.state.execution_id,
                                       what=what)
        raise_stored(rec, error_cls)


class _ExecutionContext:
    """``context.execution_context``: the execution's id under the reference's attribute name."""

    def __init__(self, execution_id: str) -> None:
        self.durable_execution_arn = execution_id


register_context_factory(DurableContext)
