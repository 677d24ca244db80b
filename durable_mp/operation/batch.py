"""``context.parallel`` and ``context.map``: the front end of a batch, and its ``BatchResult``.

A batch opens like any operation (``replay.open_operation``).  Finished, its result is
rebuilt from the items' records; resumed, the items already done are handed to the
engine with the spec (``BatchSpec.done``) and only the rest run.  Where items run is the
context state's business (``run_batch``: the driver's process pool, or threads inside a
worker).  Item records come back as ``OpRecord``s, their bytes, or ``IN_STORE`` markers
(a resumed batch's plain successes), and are decoded here into the BatchResult's columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from durable_mp import serdes as _serdes
from durable_mp.concurrency.models import BatchItemStatus, BatchResult, CompletionPolicy, CompletionReason, ItemColumns
from durable_mp.config import MapConfig, NestingType, ParallelBranch, ParallelConfig, timeout_seconds
from durable_mp.core.records import OpRecord, OpStatus, OpType
from durable_mp.core.spec import BatchSpec
from durable_mp.core.vocabulary import SubType, parallel_branch_name
from durable_mp.engine.branch import FatalBranchError
from durable_mp.engine.result_decode import COMPACT_ITEM, IN_STORE, UNREAD, fast_decodable, success_value
from durable_mp.engine.state import ContextState
from durable_mp.exceptions import NonDeterministicExecutionError, SerDesError, ValidationError
from durable_mp.lambda_service import ErrorObject
from durable_mp.operation.nesting import batch_payload, check_nesting, nesting_extra
from durable_mp.operation.protocol import DurableContextProtocol
from durable_mp.operation.replay import build_error, item_records, open_operation, resumed_items
from durable_mp.operation.signature import check_branch, check_map


def parallel(ctx: DurableContextProtocol, functions: Sequence[Callable[[Any], Any]], name: str | None,
             config: ParallelConfig | None) -> BatchResult:
    config = config or ParallelConfig()
    funcs, names = [], []
    for i, f in enumerate(functions):
        if isinstance(f, ParallelBranch):
            funcs.append(f.func)
            names.append(f.name or parallel_branch_name(i))
        elif callable(f):
            funcs.append(f)
            names.append(parallel_branch_name(i))
        else:
            raise ValidationError(f"parallel branch {i} is not callable: {type(f).__name__}")
        check_branch(funcs[-1], i)
    return run_batch(ctx, SubType.PARALLEL, SubType.PARALLEL_BRANCH, name, config, len(funcs), names, funcs=funcs)


def map_items(ctx: DurableContextProtocol, inputs: Sequence[Any], func: Callable[..., Any], name: str | None,
              config: MapConfig | None) -> BatchResult:
    config = config or MapConfig()
    check_map(func)  # before anything is dispatched: a wrong signature would fail every item
    inputs = inputs if isinstance(inputs, (list, tuple)) else list(inputs)
    name = name if name is not None else getattr(func, "_original_name", None)
    names = None
    if config.item_namer is not None:
        names = [config.item_namer(item, i) for i, item in enumerate(inputs)]
    return run_batch(ctx, SubType.MAP, SubType.MAP_ITERATION, name, config, len(inputs), names, func=func,
                     inputs=inputs)


def run_batch(ctx: DurableContextProtocol, sub_type: str, item_sub_type: str, name: str | None,
              config: ParallelConfig | MapConfig, n: int, names: list[str] | None, *,
              funcs: list[Callable[..., Any]] | None = None, func: Callable[..., Any] | None = None,
              inputs: Sequence[Any] | None = None) -> BatchResult:
    state = ctx.state
    opening = open_operation(ctx, ctx._next_id(), OpType.CONTEXT, sub_type, name)
    op_id = opening.op_id
    if opening.record is not None:
        check_nesting(opening.record, config.nesting_type)
    # ValidationError before any checkpoint
    policy = CompletionPolicy(config.completion_config, n)
    if config.max_concurrency is not None and config.max_concurrency < 1:
        raise ValidationError(f"max_concurrency must be >= 1, got {config.max_concurrency}")
    item_serdes = config.item_serdes or config.serdes
    rec = opening.record
    if rec is not None and rec.is_terminal:
        reason = CompletionReason((rec.extra or {})["completion_reason"])
        return batch_result(state, item_records(state, op_id, n), reason, item_serdes, n)
    base = opening.start(extra=nesting_extra(config.nesting_type) or None)
    if rec is None:
        done: dict[int, Any] = {}
        done_ok: dict[int, bool] = {}
        unfinished: dict[int, Any] = {}
    else:
        done, done_ok, unfinished = resumed_items(state, op_id, n)
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
        execution_id=state.execution_id,
        flat=config.nesting_type is NestingType.FLAT,
        skip_time=bool(state.skip_time),
    )
    try:
        records, reason = state.run_batch(spec)
    except FatalBranchError as fatal:  # non-determinism & co. in a branch end the execution
        failed = fatal.record
        cls_name = (failed.extra or {}).get("raise", "ExecutionError")
        error = build_error(ErrorObject.from_dict(failed.error or {}), cls_name)
        raise error from None
    reported = len(records)
    batch = batch_result(state, records, reason, item_serdes, n, op_id)
    state.emit(
        base._replace(
            status=OpStatus.SUCCEEDED,
            end_ts=time.time(),
            result=batch_payload(config, batch, op_id, state.execution_id),
            extra={"completion_reason": reason.value, "total": n, "reported": reported,
                   **nesting_extra(config.nesting_type)},
        )
    )
    return batch


# -- the BatchResult ---------------------------------------------------------------------------
def batch_result(state: ContextState, records: Any, reason: CompletionReason, item_serdes: Any, n: int,
                 op_id: str | None = None) -> BatchResult:
    """The BatchResult on columns: records not decoded yet (bytes, ``OpRecord``) are decoded here."""
    columns = records if isinstance(records, ItemColumns) else ItemColumns.of(records, n)
    exec_id = state.execution_id
    raw = columns.raw
    if raw and op_id is not None:
        _read_in_store(state, columns, op_id, fast_decodable(item_serdes))
    if raw and fast_decodable(item_serdes):
        _decode_compact(columns)
    for index in sorted(raw):
        r = raw[index]
        if not isinstance(r, OpRecord):  # a worker's record bytes (or buffer)
            r = OpRecord.loads(r)
        if r.status == OpStatus.SUCCEEDED:
            try:
                value = _serdes.deserialize(item_serdes, r.result, op_id=r.op_id,  # type: ignore[arg-type]
                                            execution_id=exec_id, what=f"result of branch {index} ({r.name})")
            except SerDesError as exc:  # the branch ran; only its result is unreadable here
                columns.set_item(index, BatchItemStatus.FAILED, None, ErrorObject.from_exception(exc))
                continue
            columns.set_item(index, BatchItemStatus.SUCCEEDED, value)
        elif r.status == OpStatus.FAILED:
            columns.set_item(index, BatchItemStatus.FAILED, None, ErrorObject.from_dict(r.error or {}))
        else:
            columns.set_item(index, BatchItemStatus.STARTED)
    return BatchResult.of_columns(columns, reason)


def _read_in_store(state: ContextState, columns: ItemColumns, op_id: str, fast: bool) -> None:
    """The records ``replay.resumed_items`` left in the store, read in one pass and decoded as they come."""
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

    state.branch_each(op_id, waiting, take)
    columns.set_values(indices, values)


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


__all__ = ["batch_result", "map_items", "parallel", "run_batch"]
