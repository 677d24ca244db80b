"""``durable_mp.map(f, items)``: the one-call API for a plain ``f(item)``, durably.

For people who write ``joblib.Parallel(n_jobs)(delayed(f)(x) for x in xs)`` or
``Executor.map(f, xs)``: no handler, no context, no store to open.  Underneath it is one
durable execution whose handler runs ``context.map`` over the items, so each item is
checkpointed on its own, a dead worker costs the item it was running, and calling the
same ``map`` again (after a crash, Ctrl-C or a fix) resumes instead of starting over.

The execution id is what makes "the same call" precise.  Without ``execution_id=`` it
hashes who ``f`` is (``identity.handler_identity``: module and name, a script's path, a
notebook cell's source, so a kernel restart still finds it), ``name`` and the items
(their canonical encoding, else their pickle), so re-running resumes while two different
calls (another function, other items) never share an execution.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from durable_mp.concurrency.models import BatchItemStatus, BatchResult
from durable_mp.config import CompletionConfig, MapConfig
from durable_mp.context import DurableContext
from durable_mp.core.canonical import NotCanonicalError, canonical_bytes
from durable_mp.core.records import PICKLE_PROTOCOL
from durable_mp.exceptions import ChildContextError, ValidationError
from durable_mp.execution import DurableFunction
from durable_mp.identity import handler_identity
from durable_mp.operation.naming import op_name
from durable_mp.operation.signature import check_callable

T = TypeVar("T")
R = TypeVar("R")

ID_PREFIX = "map"
DIGEST_BYTES = 8  # 16 hex characters, as default handler ids
NAME_CHARS = 40  # of the readable part of a derived id


class _CallPlain:
    """``f(item)`` as a map function ``(ctx, item, index, items)``; picklable when ``f`` is."""

    __slots__ = ("func",)

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func

    def __call__(self, ctx: Any, item: Any, index: int, items: Any) -> Any:
        return self.func(item)

    def __getstate__(self) -> Callable[[Any], Any]:
        return self.func

    def __setstate__(self, func: Callable[[Any], Any]) -> None:
        self.func = func


def _items_digest(items: list[Any]) -> bytes:
    try:
        return canonical_bytes(items, "items")
    except NotCanonicalError:  # arrays, custom objects: their pickle (stable for the usual values)
        try:
            return b"pickle\0" + pickle.dumps(items, protocol=PICKLE_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - say what to do instead
            raise ValidationError(f"cannot derive an execution id from the items ({exc}); pass "
                                  f"execution_id=... to durable_mp.map") from exc


def execution_id_for(func: Callable[..., Any], items: list[Any], name: str | None = None) -> str:
    """The id ``map`` uses without ``execution_id=``: readable part + hash of function, name and items."""
    label = name or getattr(func, "__name__", None) or type(func).__name__
    label = "".join(c if c.isalnum() or c in "-_." else "-" for c in label).strip("-")[:NAME_CHARS] or "func"
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for part in (handler_identity(func).encode(), (name or "").encode(), _items_digest(items)):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return f"{ID_PREFIX}-{label}-{digest.hexdigest()}"


class _MapHandler:
    """The handler of one ``map`` call, wearing ``func``'s module and code.

    ``identity.code_fingerprint`` reads them, so a re-run that returns a stored result says
    when *func's* code changed since (not this module's), and the record names the script.
    """

    def __init__(self, run: Callable[[Any, DurableContext], list[Any]], func: Callable[..., Any], label: str) -> None:
        self._body = run  # not "run": DurableFunction copies this __dict__ (functools.update_wrapper)
        self.__qualname__ = self.__name__ = f"durable_mp.map[{label}]"
        code = getattr(func, "__code__", None)
        if code is not None:
            self.__module__ = getattr(func, "__module__", None) or __name__
            self.__code__ = code
        else:  # a callable object: named by this module (its repr below is stable)
            self.__module__ = __name__

    def __call__(self, event: Any, ctx: DurableContext) -> list[Any]:
        return self._body(event, ctx)

    def __repr__(self) -> str:
        return f"<{self.__qualname__}>"


def _raise_first_failure(result: BatchResult[Any], total: int) -> None:
    failed = next((item for item in result.all if item.status is BatchItemStatus.FAILED), None)
    if failed is None:
        return
    err = failed.error
    if err is None:
        raise ChildContextError(message=f"item {failed.index} of {total} failed")
    kind = f"{err.type}: " if err.type else ""
    raise ChildContextError(message=f"item {failed.index} of {total} failed: {kind}{err.message}",
                            error_type=err.type, data=err.data, stack_trace=err.stack_trace) from err.to_exception()


def _with_errors(result: BatchResult[Any], total: int) -> list[Any]:
    """Results in input order; a failed item is its error (a ``ChildContextError`` from its remote traceback)."""
    out: list[Any] = [None] * total
    for item in result.all:
        if item.status is BatchItemStatus.SUCCEEDED:
            out[item.index] = item.result
        elif item.error is not None:
            err = item.error
            error = ChildContextError(message=err.message, error_type=err.type, data=err.data,
                                      stack_trace=err.stack_trace)
            error.__cause__ = err.to_exception()
            out[item.index] = error
    return out


def map(  # noqa: A001 - durable_mp.map, as Executor.map
    func: Callable[[T], R],
    items: Iterable[T],
    *,
    name: str | None = None,
    execution_id: str | None = None,
    store: Any = None,
    max_workers: int | None = None,
    tolerate_failures: bool = False,
    progress: bool | None = None,
    timeout: float | None = None,
    max_crash_retries: int | None = None,
    max_worker_memory: int | None = None,
) -> list[R]:
    """``[func(x) for x in items]`` on a process pool, each item checkpointed; re-running the call resumes.

    ``func`` takes one item.  Results come back in input order.  The first failure stops
    starting new items and raises ``ExecutionFailedError`` naming the item, with the
    worker-side traceback as its cause; ``tolerate_failures=True`` runs every item and puts
    each failed item's error (a ``ChildContextError``) in its place in the list instead.
    ``name`` labels the progress bar and the execution; ``execution_id`` overrides the
    derived id (see the module docstring); ``store`` is a path or ``Store`` (default
    ``./.durable_mp``); ``timeout`` is seconds per item; ``progress`` forces the bar on or off.
    """
    check_callable(func, 1, "func(item)", "durable_mp.map function")
    values = list(items)
    exec_id = execution_id or execution_id_for(func, values, name)
    label = name or op_name(func, None) or "map"  # op_name: not "<lambda>"
    completion = CompletionConfig.all_completed() if tolerate_failures else CompletionConfig()
    config: MapConfig[Any] = MapConfig(completion_config=completion, branch_timeout=timeout)
    mapped = _CallPlain(func)
    total = len(values)

    def run_items(event: Any, ctx: DurableContext) -> list[Any]:
        result = ctx.map(values, mapped, name=label, config=config)
        if not tolerate_failures:
            _raise_first_failure(result, total)
        return _with_errors(result, total)

    durable = DurableFunction(_MapHandler(run_items, func, label))
    return durable.run(None, execution_id=exec_id, store=store, max_workers=max_workers, progress=progress,
                       max_crash_retries=max_crash_retries, max_worker_memory=max_worker_memory)


__all__ = ["execution_id_for", "map"]
