"""The runners of ``durable_mp.testing`` (the reference keeps them in ``..._testing.runner``).

A drop-in for the reference testing SDK's local runner.

Tests written for ``aws_durable_execution_sdk_python_testing`` port by changing the import::

    from durable_mp.testing import DurableFunctionTestRunner

    with DurableFunctionTestRunner(handler=handler) as runner:
        result = runner.run(input='{"order": 7}')
    assert result.status is InvocationStatus.SUCCEEDED
    assert result.get_step("charge").status is OperationStatus.SUCCEEDED

Every run is a fresh durable execution (its id is an ARN-like string) in an LMDB store:
a temporary one removed by ``close()`` unless ``store=`` was given.  Branches run in
worker processes as in any durable_mp run; ``skip_time=True`` (the default) makes waits
and retry delays instant.

What differs from the reference runner:

* ``operation.result`` holds durable_mp's serdes payload (pickle ``bytes`` by default,
  a JSON string with ``JsonSerDes``/``ExtendedTypeSerDes``), not the reference's
  ``{"t","v"}`` envelope string; a Parallel/Map operation carries no result (its items
  are replayed from their own records).  ``result.result`` is the handler's return value
  through ``json.dumps`` as in the reference, except that a ``BatchResult`` or a
  dataclass is serialized (``to_dict()`` / ``asdict()``) instead of failing the run.
* ``error.stack_trace`` keeps the formatted traceback (the reference stores ``None``).
* The handler runs once, on a thread of this process: there are no invocations, so no
  ``InvocationCompleted`` history events and status ``PENDING`` never occurs.
* ``execution_timeout`` / ``timeout`` bound how long ``run`` waits: past it ``run``
  raises ``TimeoutError`` (the execution is not stopped; it cannot be, it is a thread).
  ``poll_interval``, ``max_invocation_page_bytes``, ``invocation_timeout``, ``region``,
  ``tenant_id`` and ``include_execution_data`` are accepted for compatibility.
* ``get_execution_history`` returns durable_mp's derived history (``durable_mp.inspect.history``)
  as ``HistoryEvent`` views with the reference's field names; details are the wire dicts.
* No ``register_function``/``register_durable_function``, ``get_invoke``/``InvokeOperation``
  (durable_mp has no ``invoke``), ``pause_execution``/``resume_execution``.

``DurableFunctionCloudTestRunner`` exists so that imports and ``isinstance`` checks of
the reference's cloud runner work, and refuses to be constructed: there is no cloud.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, cast

from durable_mp.core.callback_ids import encode_callback_id
from durable_mp.core.nesting import is_flat
from durable_mp.core.records import OpRecord, OpStatus, OpType
from durable_mp.core.vocabulary import SUCCEEDED
from durable_mp.exceptions import ExecutionFailedError
from durable_mp.execution import DurableFunction, durable_execution, envelope_of
from durable_mp.history_payloads import HistoryPayloads
from durable_mp.inspect.history import build_history
from durable_mp.inspect.tree import OpTree
from durable_mp.lambda_service import ErrorObject, InvocationStatus, OperationStatus, OperationSubType, OperationType
from durable_mp.store import callbacks as _callbacks
from durable_mp.store.facade import Store

__all__ = [
    "CallbackOperation", "ContextOperation", "DurableChildContextTestRunner", "DurableFunctionCloudTestRunner",
    "DurableFunctionTestResult", "DurableFunctionTestRunner", "DurableFunctionsTestError", "ExecutionOperation",
    "ExecutionStatus", "HistoryEvent", "HistoryResponse", "Operation", "StepOperation", "WaitOperation",
]

POLL_SECONDS = 0.02  # store polling of wait_for_callback; the runner is local, so polling is cheap
NAME_LIMIT = 64  # characters of function/execution name kept in an execution ARN


class DurableFunctionsTestError(Exception):
    """An operation looked up by name does not exist (the reference's error type)."""


class ExecutionStatus(Enum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    TIMED_OUT = "TIMED_OUT"


def _when(ts: float | None) -> _dt.datetime | None:
    return None if ts is None else _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc)


class _ByName:
    """``get_operation_by_name`` and its typed aliases over ``_lookup_in()``."""

    def _lookup_in(self) -> list:
        raise NotImplementedError

    def get_operation_by_name(self, name: str) -> Operation:
        for op in self._lookup_in():
            if op.name == name:
                return op
        raise DurableFunctionsTestError(f"Operation with name '{name}' not found")

    # The reference's typed accessors are casts of the same lookup.
    get_step = get_wait = get_context = get_callback = get_execution = get_operation_by_name


@dataclass(frozen=True, kw_only=True)
class Operation:
    operation_id: str
    operation_type: OperationType
    status: OperationStatus
    parent_id: str | None = None
    name: str | None = None
    sub_type: OperationSubType | str | None = None
    start_timestamp: _dt.datetime | None = None
    end_timestamp: _dt.datetime | None = None


@dataclass(frozen=True, kw_only=True)
class ExecutionOperation(Operation):
    input_payload: str | None = None


@dataclass(frozen=True, kw_only=True)
class ContextOperation(_ByName, Operation):
    child_operations: list[Operation] = field(default_factory=list)
    result: bytes | str | None = None
    error: ErrorObject | None = None

    def _lookup_in(self) -> list:
        return self.child_operations


@dataclass(frozen=True, kw_only=True)
class StepOperation(ContextOperation):
    attempt: int = 0
    next_attempt_timestamp: _dt.datetime | None = None


@dataclass(frozen=True, kw_only=True)
class WaitOperation(Operation):
    scheduled_end_timestamp: _dt.datetime | None = None


@dataclass(frozen=True, kw_only=True)
class CallbackOperation(ContextOperation):
    callback_id: str | None = None


def _view(rec: OpRecord, tree: OpTree, execution_id: str) -> Operation:
    """The reference's operation view of one record, with its subtree."""
    try:
        sub_type: Any = OperationSubType(rec.sub_type)
    except ValueError:  # a user's own sub_type (StepConfig(sub_type=...))
        sub_type = rec.sub_type
    common: dict[str, Any] = dict(
        operation_id=rec.op_id, operation_type=OperationType(rec.op_type), status=OperationStatus(rec.status),
        parent_id=rec.parent_id or None, name=rec.name, sub_type=sub_type, start_timestamp=_when(rec.start_ts),
        end_timestamp=_when(rec.end_ts))
    if rec.op_type == OpType.WAIT:
        return WaitOperation(**common, scheduled_end_timestamp=_when((rec.extra or {}).get("scheduled_end")))
    children = tree.children(rec.op_id)
    if is_flat(rec.extra):  # virtual branches: their item rows are no operations (``core.nesting``)
        children = [c for c in children if not tree.is_virtual(c)]
    payload: dict[str, Any] = dict(
        child_operations=[_view(c, tree, execution_id) for c in children],
        result=rec.result, error=ErrorObject.from_dict(rec.error) if rec.error else None)
    if rec.op_type == OpType.STEP:
        return StepOperation(**common, **payload, attempt=rec.attempt,
                             next_attempt_timestamp=_when(rec.next_attempt_ts))
    if rec.op_type == OpType.CALLBACK:
        return CallbackOperation(**common, **payload,
                                 callback_id=encode_callback_id(execution_id, rec.parent_id, rec.op_id))
    return ContextOperation(**common, **payload)


@dataclass(frozen=True)
class DurableFunctionTestResult(_ByName):
    status: InvocationStatus
    operations: list[Operation]
    result: str | None = None
    error: ErrorObject | None = None
    execution_status: ExecutionStatus | None = None

    def _lookup_in(self) -> list:
        return self.operations

    def get_all_operations(self) -> list[Operation]:
        """Every operation, depth first, last sibling first (the reference's order)."""
        out: list[Operation] = []
        stack = list(self.operations)
        while stack:
            op = stack.pop()
            out.append(op)
            stack.extend(getattr(op, "child_operations", ()))
        return out


@dataclass(frozen=True)
class HistoryEvent:
    """One event of ``get_execution_history`` under the reference's field names."""

    event_type: str
    event_timestamp: _dt.datetime | None
    sub_type: str | None
    event_id: int
    operation_id: str
    name: str | None
    parent_id: str | None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"EventType": self.event_type, "SubType": self.sub_type, "EventId": self.event_id,
                "Id": self.operation_id, "Name": self.name, "ParentId": self.parent_id,
                "EventTimestamp": self.event_timestamp.isoformat() if self.event_timestamp else None,
                **({f"{self.event_type}Details": self.details} if self.details else {})}


@dataclass(frozen=True)
class HistoryResponse:
    events: list[HistoryEvent]


class _Run:
    """One execution started by the runner, running on its own thread."""

    def __init__(self, arn: str, event: Any) -> None:
        self.arn = arn
        self.event = event
        self.value: Any = None
        self.error: ErrorObject | None = None
        self.exception: BaseException | None = None
        self.done = threading.Event()
        self.thread: threading.Thread | None = None


def _decode_input(data: Any) -> Any:
    """JSON input as the handler sees it: ``None`` stays None, a non-JSON string stays a string.

    Any other value (a dict, a list) is JSON-encoded first, as the reference runner does, so
    the handler sees exactly what a JSON event would give it.
    """
    if data is None:
        return None
    if not isinstance(data, str | bytes | bytearray):
        return json.loads(json.dumps(data))
    try:
        return json.loads(data)
    except ValueError:
        return data.decode() if isinstance(data, bytes) else data


class DurableFunctionTestRunner:
    """Run a ``@durable_execution`` handler locally and inspect what it recorded."""

    def __init__(self, handler: Callable, poll_interval: float = 1.0, max_invocation_page_bytes: int | None = None,
                 execution_timeout: int = 300, invocation_timeout: int = 900, store: Any = None,
                 skip_time: bool = True, region: str = "us-west-2") -> None:
        self.handler: DurableFunction = handler if isinstance(handler, DurableFunction) else durable_execution(handler)
        self.poll_interval = poll_interval
        self.execution_timeout = execution_timeout
        self.invocation_timeout = invocation_timeout
        self.skip_time = skip_time
        self.region = region
        self._tmpdir: str | None = None
        if store is None:
            self._tmpdir = tempfile.mkdtemp(prefix="durable_mp-test-")
            store = os.path.join(self._tmpdir, "store")
        self._owns_store = not isinstance(store, Store)
        self.store: Store = Store(store) if self._owns_store else store
        self._runs: dict[str, _Run] = {}

    def __enter__(self) -> DurableFunctionTestRunner:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the store the runner opened and remove its temporary directory.

        An execution still running (a callback nobody answered) keeps both: its thread
        cannot be stopped, and deleting a store under it would corrupt its run.
        """
        if any(not run.done.is_set() for run in self._runs.values()):
            warnings.warn("DurableFunctionTestRunner closed with executions still running; store kept",
                          ResourceWarning, stacklevel=2)
            return
        if self._owns_store:
            self.store.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # -- running ----------------------------------------------------------------------------
    def run(self, input: str | None = None, execution_timeout: int | None = None,  # noqa: A002
            timeout: int | None = None, function_name: str = "test-function",
            execution_name: str = "execution-name", account_id: str = "123456789012",
            tenant_id: str | None = None) -> DurableFunctionTestResult:
        """Run a fresh execution to its end; ``TimeoutError`` if it takes longer than the timeout."""
        if timeout is not None:
            warnings.warn("run(timeout=) is deprecated, use execution_timeout=", DeprecationWarning, stacklevel=2)
        arn = self.run_async(input, execution_timeout, None, function_name, execution_name, account_id, tenant_id)
        limit = execution_timeout if execution_timeout is not None else timeout
        return self.wait_for_result(arn, limit if limit is not None else self.execution_timeout)

    def run_async(self, input: str | None = None, execution_timeout: int | None = None,  # noqa: A002
                  timeout: int | None = None, function_name: str = "test-function",
                  execution_name: str = "execution-name", account_id: str = "123456789012",
                  tenant_id: str | None = None) -> str:
        """Start a fresh execution on a background thread; returns its ARN (the execution id)."""
        arn = (f"arn:aws:lambda:{self.region}:{account_id}:function:{function_name[:NAME_LIMIT]}"
               f"/durable-execution/{execution_name[:NAME_LIMIT]}/{uuid.uuid4().hex}")
        run = self._runs[arn] = _Run(arn, _decode_input(input))
        run.thread = threading.Thread(target=self._execute, args=(run,), name=f"durable_mp-test-{arn[-8:]}",
                                      daemon=True)
        run.thread.start()
        return arn

    def _execute(self, run: _Run) -> None:
        try:
            run.value = self.handler.run(run.event, store=self.store, execution_id=run.arn,
                                         skip_time=self.skip_time)
        except ExecutionFailedError as exc:
            run.error = cast(ErrorObject, exc.error)  # handler.run raises it with an ErrorObject
        except BaseException as exc:  # noqa: BLE001 - handed to wait_for_result's caller
            run.exception = exc
        finally:
            run.done.set()

    def _run_of(self, arn: str) -> _Run:
        run = self._runs.get(arn)
        if run is None:
            raise ValueError(f"unknown execution {arn!r}: not started by this runner")
        return run

    def wait_for_result(self, execution_arn: str, timeout: float = 60) -> DurableFunctionTestResult:
        """The result of an execution started by ``run_async``, once it has finished."""
        run = self._run_of(execution_arn)
        if not run.done.wait(timeout):
            raise TimeoutError("Execution did not complete within timeout")
        if run.exception is not None:
            raise run.exception
        execution = self.store.get_execution(execution_arn)
        if execution is None:  # run() raised before it recorded the execution: run.exception is set
            raise RuntimeError(f"execution {execution_arn!r} has no record in the store")
        status, payload, error = InvocationStatus.FAILED, None, run.error
        execution_status = ExecutionStatus(execution.status)
        if error is None:
            envelope = envelope_of(run.value)
            if envelope["Status"] == SUCCEEDED:
                payload, status = envelope["Result"], InvocationStatus.SUCCEEDED
            else:  # the reference's envelope fails the execution here
                error, execution_status = ErrorObject.from_dict(envelope["Error"]), ExecutionStatus.FAILED
        tree = OpTree(execution, self.store.ops(execution_arn))
        operations = [_view(rec, tree, execution_arn) for rec in tree.children("")]
        return DurableFunctionTestResult(status, operations, payload, error, execution_status)

    # -- callbacks --------------------------------------------------------------------------
    def wait_for_callback(self, execution_arn: str, name: str | None = None, timeout: float = 60) -> str:
        """The id of a STARTED callback of the execution (named ``name`` or ``"{name} create callback id"``)."""
        run = self._run_of(execution_arn)
        wanted = None if name is None else {name, f"{name} create callback id"}
        deadline = time.monotonic() + timeout
        while True:
            finished = run.done.is_set()  # read before the store: a last callback is still seen
            for rec in self.store.ops(execution_arn):
                if rec.op_type == OpType.CALLBACK and rec.status == OpStatus.STARTED and (
                        wanted is None or rec.name in wanted):
                    return encode_callback_id(execution_arn, rec.parent_id, rec.op_id)
            if finished:
                raise ValueError(f"execution {execution_arn!r} finished without an active callback {name!r}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no active callback {name!r} within {timeout} s")
            time.sleep(min(self.poll_interval, POLL_SECONDS))

    def send_callback_success(self, callback_id: str, result: bytes | None = None) -> None:
        _callbacks.send_callback_success(callback_id, result, store=self.store)

    def send_callback_failure(self, callback_id: str, error: ErrorObject | None = None) -> None:
        _callbacks.send_callback_failure(callback_id, error, store=self.store)

    def send_callback_heartbeat(self, callback_id: str) -> None:
        _callbacks.send_callback_heartbeat(callback_id, store=self.store)

    # -- history ----------------------------------------------------------------------------
    def get_execution_history(self, execution_arn: str, include_execution_data: bool = False) -> HistoryResponse:
        """The execution's events in the reference's event model (``durable_mp.inspect.history``)."""
        execution = self.store.get_execution(execution_arn)
        if execution is None:
            raise ValueError(f"unknown execution {execution_arn!r}")
        events = build_history(execution, self.store.ops(execution_arn), HistoryPayloads())
        return HistoryResponse([HistoryEvent(e.event_type, _when(e.timestamp), e.sub_type, e.event_id, e.op_id,
                                             e.name, e.parent_id, dict(e.details)) for e in events])


class DurableChildContextTestRunner(DurableFunctionTestRunner):
    """Test a ``@durable_with_child_context`` function in isolation.

    As in the reference, ``context_function(*args, **kwargs)`` is called with the root
    context of a fresh execution (no child context operation is recorded around it).
    """

    def __init__(self, context_function: Callable, *args: Any, skip_time: bool = True, **kwargs: Any) -> None:
        def handler(event: Any, context: Any) -> Any:
            return context_function(*args, **kwargs)(context)

        handler.__qualname__ = f"{getattr(context_function, '__qualname__', 'context_function')}.test_handler"
        super().__init__(durable_execution(handler), skip_time=skip_time)


class DurableFunctionCloudTestRunner:
    """The reference's runner for deployed Lambda functions; durable_mp runs locally only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("durable_mp has no cloud: use DurableFunctionTestRunner (local processes)")
