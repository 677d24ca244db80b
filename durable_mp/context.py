"""``DurableContext``: the handler's view of a durable execution, a thin facade.

A context owns a position in the operation tree (its own operation id, ``""`` at the
root) and a per-context counter that names its operations deterministically.  Each
operation is a module of ``durable_mp.operation`` (``step``, ``child``, ``batch``,
``wait``, ``wait_for_condition``, ``callback``), and each opens through
``operation.replay``: a terminal checkpoint is returned (or re-raised) without running
user code.  How work is recorded and where branches run is the job of the *state* behind
the context (``engine.state.ContextState``): ``DriverState`` (driver process, process
pool) or ``WorkerContextState`` (inside a worker, threads for nested batches).  The
context itself is identical in both places, which is what makes replay inside a
re-dispatched branch work.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from durable_mp.core.records import operation_id
from durable_mp.engine.state import ContextState, register_context_factory
from durable_mp.exceptions import ValidationError
from durable_mp.logger import Logger

if TYPE_CHECKING:
    from durable_mp.concurrency.models import BatchResult
    from durable_mp.config import ChildConfig, Duration, MapConfig, ParallelConfig, StepConfig
    from durable_mp.config import ParallelBranch as ParallelBranch
    from durable_mp.decorators import durable_parallel_branch as durable_parallel_branch
    from durable_mp.decorators import durable_step as durable_step
    from durable_mp.decorators import durable_wait_for_callback as durable_wait_for_callback
    from durable_mp.decorators import durable_with_child_context as durable_with_child_context
    from durable_mp.types import StepContext as StepContext
    from durable_mp.types import WaitForCallbackContext as WaitForCallbackContext
    from durable_mp.waits import WaitForConditionConfig

# Names the reference's examples import from ``context`` (the decorators, ParallelBranch,
# the wait config, ``types``' StepContext and WaitForCallbackContext), imported on first
# use (PEP 562) like the operations below: a worker imports this module before its first
# branch, and a branch that calls no operation needs none of them (the configs, the
# concurrency models, the operations were a third of a fresh worker's imports; issue 23
# target 4).
_REEXPORTS = {"ParallelBranch": "durable_mp.config", "WaitForConditionConfig": "durable_mp.waits",
              "durable_parallel_branch": "durable_mp.decorators", "durable_step": "durable_mp.decorators",
              "durable_wait_for_callback": "durable_mp.decorators",
              "durable_with_child_context": "durable_mp.decorators", "StepContext": "durable_mp.types",
              "WaitForCallbackContext": "durable_mp.types"}


def __getattr__(name: str) -> Any:
    module = _REEXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


T = TypeVar("T")
U = TypeVar("U")


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

    def __init__(self, state: ContextState, op_id: str = "", *, logger: Logger | None = None,
                 parent_id: str | None = None) -> None:
        self.state = state
        self._op_id = op_id  # prefix of this context's operation ids
        # parent_id of this context's records: its own id, or a virtual context's enclosing one
        self._parent_id = op_id if parent_id is None else parent_id
        self._counter = 0
        self.is_virtual = self._parent_id != op_id  # a FLAT branch, or ChildConfig(is_virtual=True)
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

    def is_replaying(self) -> bool:
        """True while the next operation of this context has a terminal checkpoint."""
        from durable_mp.operation.replay import is_replayed

        return is_replayed(self.state, self._parent_id, operation_id(self._op_id, self._counter + 1))

    def create_child_context(self, operation_id: str, *, is_virtual: bool = False) -> DurableContext:
        return DurableContext(self.state, operation_id, logger=self.logger,
                              parent_id=self._parent_id if is_virtual else None)

    def set_logger(self, new_logger: Any) -> None:
        self.logger.set_logger(new_logger)

    # -- operations: each is a module of ``durable_mp.operation`` ---------------------------
    def step(self, func: Callable[..., T], name: str | None = None, config: StepConfig | None = None) -> T:
        """Run ``func(StepContext)`` once, checkpoint its result, retry by the strategy."""
        from durable_mp.operation.step import step

        result: T = step(self, func, name, config)
        return result

    def run_in_child_context(
        self, func: Callable[[DurableContext], T], name: str | None = None, config: ChildConfig | None = None
    ) -> T:
        """Run ``func(child_context)``; its operations are grouped (and replayed) under one op."""
        from durable_mp.operation.child import run_in_child_context

        result: T = run_in_child_context(self, func, name, config)
        return result

    def parallel(
        self,
        functions: Sequence[Callable[[DurableContext], T]],
        name: str | None = None,
        config: ParallelConfig | None = None,
    ) -> BatchResult[T]:
        """Run each function in its own branch (a worker process at the top level)."""
        from durable_mp.operation.batch import parallel

        return parallel(self, functions, name, config)

    def map(
        self,
        inputs: Sequence[U],
        func: Callable[[DurableContext, U, int, Sequence[U]], T],
        name: str | None = None,
        config: MapConfig | None = None,
    ) -> BatchResult[T]:
        """Call ``func(ctx, item, index, inputs)`` for every item, each checkpointed on its own."""
        from durable_mp.operation.batch import map_items

        return map_items(self, inputs, func, name, config)

    def wait(self, duration: Duration, name: str | None = None) -> None:
        """Sleep durably: a resumed execution only waits for what is left."""
        from durable_mp.operation.wait import wait

        wait(self, duration, name)

    def wait_for_condition(
        self, check: Callable[[T, Any], T], config: WaitForConditionConfig, name: str | None = None
    ) -> T:
        """Poll ``check(state, ctx)`` until the wait strategy stops; each poll is checkpointed."""
        from durable_mp.operation.wait_for_condition import run_wait_for_condition

        result: T = run_wait_for_condition(self, check, config, name)
        return result

    def create_callback(self, name: str | None = None, config: Any = None) -> Any:
        """A callback another process completes (``durable_mp.store.callbacks.send_callback_success``)."""
        from durable_mp.operation.callback import create_callback

        return create_callback(self, name, config)

    def wait_for_callback(self, submitter: Callable[[str, Any], None], name: str | None = None,
                          config: Any = None) -> Any:
        """Create a callback, hand its id to ``submitter`` (a step), and wait for the result."""
        from durable_mp.operation.callback import wait_for_callback

        return wait_for_callback(self, submitter, name, config)


class _ExecutionContext:
    """``context.execution_context``: the execution's id under the reference's attribute name."""

    def __init__(self, execution_id: str) -> None:
        self.durable_execution_arn = execution_id


register_context_factory(DurableContext)

if TYPE_CHECKING:  # both states behind a context are complete ContextStates (checked by mypy)
    from durable_mp.engine.driver import DriverState
    from durable_mp.engine.worker_state import WorkerContextState

    _STATES: tuple[type[ContextState], ...] = (DriverState, WorkerContextState)
