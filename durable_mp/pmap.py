"""``durable_mp.map(f, items)``: the one-call API for a plain ``f(item)``, durably.

For people who write ``joblib.Parallel(n_jobs)(delayed(f)(x) for x in xs)`` or
``Executor.map(f, xs)``: no handler, no context, no store to open.  Underneath it is one
durable execution whose handler runs ``context.map`` over the items, so each item is
checkpointed on its own, a dead worker costs the item it was running, and calling the
same ``map`` again (after a crash, Ctrl-C or a fix) resumes instead of starting over.

Which computation a call is (DESIGN §2): ``identity.callable_identity`` names the
function (which lambda or nested function, its closure values and defaults, a bound
method's instance, a partial's arguments, a callable object's state) and with ``name``
makes the computation digest; each item is named by ``key(item)`` (default: the item),
hashed by ``core.digest`` (``map_keys``).  The execution id hashes both, so re-running the
same call resumes it, while two calls that differ in any of these never share an execution.
Results are reused per item across executions of the same computation and code
(``map_items``), and the code (``identity.code_digest``) decides when they are stale.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from durable_mp.concurrency.models import BatchItemStatus, BatchResult
from durable_mp.config import CompletionConfig, MapConfig, timeout_seconds
from durable_mp.context import DurableContext
from durable_mp.core.digest import digest_of_parts
from durable_mp.exceptions import ChildContextError, ExecutionFailedError, ValidationError
from durable_mp.execution import DurableFunction
from durable_mp.identity import code_digest
from durable_mp.lambda_service import ErrorObject
from durable_mp.map_errors import MapInterrupted, item_error, quiet_interrupts
from durable_mp.map_handler import CallPlain, MapHandler
from durable_mp.map_items import (
    CODES_KEY,
    STORED_RESULT,
    MissingResults,
    Plan,
    find_reusable,
    outcomes,
    plan_of,
    read_items,
)
from durable_mp.map_keys import (  # re-exported: their documented home is durable_mp.pmap
    DIGEST_BYTES,
    ID_PREFIX,
    _computation,
    _item_keys,
    _label_of,
    execution_id_for,
    file_content_key,
    file_key,
)
from durable_mp.map_keys import PARALLEL_HASH_BYTES as PARALLEL_HASH_BYTES  # tests name it here
from durable_mp.operation.naming import op_name
from durable_mp.operation.signature import check_callable
from durable_mp.rerun import CODE_KEY, announce, delete_command, with_extra
from durable_mp.store.facade import FAILED, SUCCEEDED, ExecutionRecord, Store
from durable_mp.store.maintenance import check_deletable

T = TypeVar("T")
R = TypeVar("R")

class _Raise(Exception):
    """Carries the exception ``map`` raises up to ``map`` itself, so the user's traceback is two frames."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Outcome:
    """What the handler saw, for ``map`` to read after ``DurableFunction.run`` returned or raised."""

    def __init__(self) -> None:
        self.batch: BatchResult[Any] | None = None
        self.failed: tuple[int, ErrorObject] | None = None


def _check_options(on_code_change: str | None) -> None:
    if on_code_change not in (None, "keep", "recompute"):
        raise ValidationError(f"on_code_change must be 'keep' or 'recompute', got {on_code_change!r}")


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts or time.time()))


def map(  # noqa: A001 - durable_mp.map, as Executor.map
    func: Callable[[T], R],
    items: Iterable[T],
    *,
    name: str | None = None,
    key: Callable[[T], Any] | None = None,
    execution_id: str | None = None,
    store: Any = None,
    max_workers: int | None = None,
    tolerate_failures: bool = False,
    progress: bool | None = None,
    timeout: float | None = None,
    max_crash_retries: int | None = None,
    max_worker_memory: int | None = None,
    start_method: str | None = None,
    backend: Any = None,
    recompute: bool = False,
    on_code_change: str | None = None,
) -> list[R]:
    """``[func(x) for x in items]`` on a process pool, each item checkpointed; re-running the call resumes.

    ``func`` takes one item.  Results come back in input order.  The first failure stops
    starting new items and raises the function's own exception (``except KeyError:``
    catches a ``KeyError``), with the item's ``index`` and the worker's traceback as its
    cause; ``tolerate_failures=True`` runs every item and puts each failed item's
    exception in its place in the list instead.

    Results are kept per item and reused by any later call of the same computation
    (function, the values it carries, ``name``) with the same code in the same store: a
    longer list runs only its new items.  ``key(item)`` names an item for that (default:
    the item itself); ``file_key``/``file_content_key`` suit items that are file paths.
    After a successful run, changed code recomputes; after a failed or interrupted run it
    is taken as the fix and finished items are kept.  ``on_code_change='keep'`` keeps old
    results anyway, ``'recompute'`` always recomputes; ``recompute=True`` ignores every
    stored result.  ``store``: a path or ``Store`` (default ``./.durable_mp``);
    ``timeout``: seconds per item; ``start_method`` and ``backend`` ('dask' or a
    ``distributed.Client``) as for handlers; ``execution_id`` overrides the derived id.
    """
    check_callable(func, 1, "func(item)", "durable_mp.map function")
    _check_options(on_code_change)
    timeout = timeout_seconds(timeout, "durable_mp.map timeout (seconds per item)")
    values = list(items)
    computation = _computation(func, name)
    keys = _item_keys(values, key)
    label = _label_of(func, name)
    exec_id = execution_id or (f"{ID_PREFIX}-{label}-"
                               f"{digest_of_parts(computation, keys)[:DIGEST_BYTES].hex()}")
    bar = name or op_name(func, None) or "map"  # op_name: not "<lambda>"
    code = code_digest(func)
    owned = not isinstance(store, Store)
    db = Store(store) if owned else store
    try:
        try:
            return _run(db, func, values, computation=computation, keys=keys, exec_id=exec_id, label=label, bar=bar,
                        code=code, tolerate_failures=tolerate_failures, timeout=timeout, recompute=recompute,
                        on_code_change=on_code_change,
                        run_options={"max_workers": max_workers, "progress": progress,
                                     "max_crash_retries": max_crash_retries, "max_worker_memory": max_worker_memory,
                                     "start_method": start_method, "backend": backend})
        except _Raise as what:  # raised here, so its traceback is the caller's line and this one
            raise what.error from what.error.__cause__
    finally:
        if owned:
            db.close()


def _start_over(db: Store, rec: ExecutionRecord) -> None:
    """Delete a map execution to compute it again; never one a live driver is running."""
    check_deletable(rec, force=True)  # ExecutionLockedError while its driver runs
    db.delete_execution(rec.exec_id)


def _run(db: Store, func: Callable[..., Any], values: list[Any], *, computation: bytes, keys: bytes, exec_id: str,
         label: str, bar: str, code: str, tolerate_failures: bool, timeout: float | None, recompute: bool,
         on_code_change: str | None, run_options: dict[str, Any]) -> list[Any]:
    total = len(values)
    rec = db.get_execution(exec_id)
    plan = plan_of(rec) if rec is not None else None
    if rec is not None and plan is not None and plan.keys != keys:
        raise ValidationError(f"execution {exec_id!r} was created for other items; pass another execution_id "
                              f"or delete it: {delete_command(db, exec_id)}")
    if rec is not None and (plan is None or plan.computation != computation):
        raise ValidationError(f"execution {exec_id!r} holds another computation; pass another execution_id "
                              f"or delete it: {delete_command(db, exec_id)}")
    if rec is not None and plan is not None:
        changed = (rec.extra or {}).get(CODE_KEY) != code
        if recompute:
            announce(f"{label}: recompute=True: computing all {total} items again")
            _start_over(db, rec)
            rec = plan = None
        elif rec.status == SUCCEEDED:
            if not changed or on_code_change == "keep":
                try:
                    out, first_failure = _stored_results(db, exec_id, plan)
                except MissingResults:
                    announce(f"{label}: results of an earlier run were deleted; computing the items again")
                    _start_over(db, rec)
                    rec = plan = None
                else:
                    if total:
                        announce(f"{label}: all {total} items were computed at {_when(rec.ended_ts)}; returning the "
                                 f"stored results, nothing ran"
                                 + (" (the function's code CHANGED since: on_code_change='keep' keeps the old "
                                    "results)" if changed else " (recompute=True runs them again)"))
                    if first_failure is not None and not tolerate_failures:
                        raise _Raise(first_failure)  # stored by a tolerate_failures=True call
                    return out
            else:
                announce(f"{label}: the function's code changed since its results were computed "
                         f"({_when(rec.ended_ts)}); computing the {total} items again "
                         f"(on_code_change='keep' would return the old results)")
                _start_over(db, rec)
                rec = plan = None
        elif changed and on_code_change == "recompute":
            announce(f"{label}: the function's code changed since the last run; on_code_change='recompute': "
                     f"computing all {total} items again")
            _start_over(db, rec)
            rec = plan = None
        else:
            done, _failed = outcomes(db, exec_id)
            finished = plan.reused + len(done)
            text = f"resuming: {finished} of {total} items already done"
            if rec.status == FAILED:
                text = f"{label}: an earlier run FAILED; " + text + ", the failed and unfinished ones run"
            if changed:
                text += (" with the changed code (taken as the fix; finished items are kept, "
                         "on_code_change='recompute' computes all again)")
                history = (rec.extra or {}).get(CODES_KEY) or [(1, (rec.extra or {}).get(CODE_KEY), 0)]
                db.put_execution(with_extra(rec, **{CODES_KEY: [*history, (rec.runs + 1, code, len(done))]}))
            announce(text)
    if plan is None:
        plan = Plan(computation, keys, list(range(total)))
        if not recompute:
            plan.reuse = find_reusable(db, plan, code, exec_id)
            taken = {index for pairs in plan.reuse.values() for index, _ in pairs}
            plan.run = [i for i in range(total) if i not in taken]
            if taken:
                announce(f"{label}: {len(taken)} of {total} items were already computed by the same function "
                         f"and code; running the other {len(plan.run)}")
    return _execute(db, func, values, plan, exec_id=exec_id, label=label, bar=bar, code=code,
                    tolerate_failures=tolerate_failures, timeout=timeout, run_options=run_options)


def _execute(db: Store, func: Callable[..., Any], values: list[Any], plan: Plan, *, exec_id: str, label: str,
             bar: str, code: str, tolerate_failures: bool, timeout: float | None,
             run_options: dict[str, Any]) -> list[Any]:
    total = len(values)
    completion = CompletionConfig.all_completed() if tolerate_failures else CompletionConfig()
    config: MapConfig[Any] = MapConfig(completion_config=completion, branch_timeout=timeout)
    mapped = CallPlain(func)
    seen = _Outcome()

    def run_items(event: Plan, ctx: DurableContext) -> str:
        todo = [values[i] for i in event.run]
        named = config
        if event.run != list(range(len(values))):  # some items reused: name each by its place in the input
            named = dataclasses.replace(config, item_namer=lambda _item, j: f"item-{event.run[j]}")
        result = ctx.map(todo, mapped, name=bar, config=named)
        seen.batch = result
        failed = None
        if result.has_failure:  # the columns know without making an item object per item
            failed = next((item for item in result.all if item.status is BatchItemStatus.FAILED), None)
        if failed is not None and not tolerate_failures:
            err = failed.error or ErrorObject.from_message("failed")
            seen.failed = (event.run[failed.index], err)
            raise ChildContextError(message=f"item {event.run[failed.index]} of {total} failed: {err.type}: "
                                            f"{err.message}", error_type=err.type, stack_trace=err.stack_trace)
        return STORED_RESULT

    durable = DurableFunction(MapHandler(run_items, func, label, code))
    try:
        durable.run(plan, execution_id=exec_id, store=db, **run_options)
    except ExecutionFailedError:
        if seen.failed is None:
            raise
        index, err = seen.failed
        raise _Raise(item_error(err, index, total, exec_id)) from None
    except KeyboardInterrupt:
        quiet_interrupts()
        done, _failed = outcomes(db, exec_id)
        line = (f"{label}: interrupted with {plan.reused + len(done)} of {total} items done; run the same call "
                f"again to resume")
        announce(line)
        raise _Raise(MapInterrupted(line)) from None
    out: list[Any] = [None] * total
    batch = seen.batch
    if batch is not None and batch.success_count == len(plan.run):  # all succeeded: the values, in order
        values_here = batch.get_results()
        if len(plan.run) == total:
            out = values_here
        else:
            for index, value in zip(plan.run, values_here, strict=True):
                out[index] = value
    elif batch is not None:
        for item in batch.all:
            index = plan.run[item.index]
            if item.status is BatchItemStatus.SUCCEEDED:
                out[index] = item.result
            elif item.error is not None:
                out[index] = item_error(item.error, index, total, exec_id)
    _fill_reused(db, out, plan, exec_id)
    return out


def _fill_reused(db: Store, out: list[Any], plan: Plan, exec_id: str) -> None:
    for source, pairs in plan.reuse.items():
        got = read_items(db, source, [batch_index for _, batch_index in pairs])
        for (index, _), (ok, value) in zip(pairs, got, strict=True):
            if not ok:
                raise MissingResults(f"item {index} of execution {source!r} is no longer a success")
            out[index] = value


def _stored_results(db: Store, exec_id: str, plan: Plan) -> tuple[list[Any], BaseException | None]:
    """A finished map's results read back from the item records, and its first failed item's error."""
    out: list[Any] = [None] * plan.total
    failures: dict[int, BaseException] = {}
    for (ok, value), index in zip(read_items(db, exec_id, list(range(len(plan.run)))), plan.run, strict=True):
        if ok:
            out[index] = value
        else:
            out[index] = failures[index] = item_error(value, index, plan.total, exec_id)
    _fill_reused(db, out, plan, exec_id)
    return out, failures[min(failures)] if failures else None


__all__ = ["MapInterrupted", "execution_id_for", "file_content_key", "file_key", "item_error", "map"]
