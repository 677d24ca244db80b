"""Errors that reach the user carry the original type and the worker-side traceback (issue 10, item 2).

Shown the way ``concurrent.futures`` shows ``_RemoteTraceback``: a ``RemoteTraceback`` whose
text is the worker's traceback sits at the root of the ``__cause__`` chain.
"""

from __future__ import annotations

import inspect
import traceback

import pytest

from durable_mp import ChildContextError, ExecutionFailedError, StepError, durable_execution
from durable_mp.config import StepConfig
from durable_mp.core.remote import RemoteTraceback, origin_type, user_frame
from durable_mp.lambda_service import ErrorObject
from durable_mp.retries import RetryPresets

pytestmark = pytest.mark.timeout(60)

HERE = __file__


def divide(ctx, x, index, items):
    return 1 // (x - 2)  # item 2 raises here


DIVIDE_LINE = inspect.getsourcelines(divide)[1] + 1


def chain(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None:
        out.append(exc)
        exc = exc.__cause__
    return out


def shown(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


@durable_execution
def map_then_throw(event, ctx):
    ctx.map([1, 2, 3], divide, name="divide").throw_if_error()


def test_failed_map_item_shows_the_worker_traceback_with_type_file_and_line(store_path):
    with pytest.raises(ExecutionFailedError) as info:
        map_then_throw.run(None, store=store_path, execution_id="remote-tb")
    text = shown(info.value)
    assert "RemoteTraceback" in text
    assert f'File "{HERE}", line {DIVIDE_LINE}, in divide' in text
    assert "ZeroDivisionError: integer division or modulo by zero" in text
    assert isinstance(chain(info.value)[-1], RemoteTraceback)
    # the one-line message names the original type and the user's line, too
    assert "ZeroDivisionError" in str(info.value) and f"{HERE}:{DIVIDE_LINE}" in str(info.value)
    # the reference's attributes stay as they were
    assert info.value.error.type == "durable_mp.exceptions.ChildContextError"
    assert info.value.error.message == "integer division or modulo by zero"


def test_stored_failure_shows_the_same_remote_traceback_on_a_rerun(store_path):
    with pytest.raises(ExecutionFailedError):
        map_then_throw.run(None, store=store_path, execution_id="remote-tb")
    with pytest.raises(ExecutionFailedError) as again:
        map_then_throw.run(None, store=store_path, execution_id="remote-tb")
    text = shown(again.value)
    assert f'File "{HERE}", line {DIVIDE_LINE}, in divide' in text and "RemoteTraceback" in text


def test_throw_if_error_raises_child_context_error_from_the_remote_traceback(store_path):
    @durable_execution
    def handler(event, ctx):
        try:
            ctx.map([1, 2, 3], divide).throw_if_error()
        except ChildContextError as exc:
            return [exc.message, exc.error_type, type(exc.__cause__).__name__, shown(exc)]

    message, error_type, cause, text = handler.run(None, store=store_path)
    assert (message, error_type, cause) == ("integer division or modulo by zero", "ZeroDivisionError",
                                            "DurableOperationError")
    assert f'File "{HERE}", line {DIVIDE_LINE}, in divide' in text and "RemoteTraceback" in text


def failing_step(step_ctx):
    raise KeyError("missing-key")  # the step fails here


STEP_LINE = inspect.getsourcelines(failing_step)[1] + 1


def test_step_error_in_a_branch_shows_where_the_step_failed(store_path):
    def branch(ctx):
        try:
            ctx.step(failing_step, config=StepConfig(retry_strategy=RetryPresets.none()))
        except StepError as exc:
            return shown(exc)

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([branch]).get_results()[0]

    text = handler.run(None, store=store_path)
    assert f'File "{HERE}", line {STEP_LINE}, in failing_step' in text
    assert "KeyError: 'missing-key'" in text


@pytest.mark.process_free
def test_error_object_helpers_read_type_and_user_frame():
    try:
        divide(None, 2, 0, [])
    except ZeroDivisionError as exc:
        err = ErrorObject.from_exception(exc)
    assert origin_type(err.stack_trace) == "ZeroDivisionError"
    frame = user_frame(err.stack_trace)
    assert (frame.file, frame.line, frame.func) == (HERE, DIVIDE_LINE, "divide")
    rebuilt = err.to_exception()
    assert isinstance(rebuilt.__cause__, RemoteTraceback)
    assert ErrorObject("m", "T", None, ["line 1\n"]).to_exception().__cause__ is None  # not a traceback


def test_show_names_the_original_type_and_the_users_line(store_path):
    import subprocess
    import sys

    with pytest.raises(ExecutionFailedError):
        map_then_throw.run(None, store=store_path, execution_id="remote-show")
    out = subprocess.run([sys.executable, "-m", "durable_mp", "show", "remote-show", "--store", store_path],
                         capture_output=True, text=True, timeout=60).stdout
    where = f"at {HERE}:{DIVIDE_LINE} in divide"
    assert f"error: ChildContextError: integer division or modulo by zero (raised as ZeroDivisionError {where})" in out
    assert f"error: ZeroDivisionError: integer division or modulo by zero ({where})" in out


def test_a_failed_branch_traceback_starts_in_user_code(store_path):
    def boom(ctx):
        raise RuntimeError("orders service down")

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([boom]).all[0].error.stack_trace

    trace = "".join(handler.run(None, store=store_path))
    assert "engine/branch.py" not in trace, trace
    assert __file__ in trace and "orders service down" in trace
