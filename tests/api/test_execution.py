"""``@durable_execution``: the Lambda-style envelope, failures at the root, default execution ids."""

from __future__ import annotations

import pytest

from durable_mp import ExecutionFailedError, durable_execution
from util import run_skip_time

pytestmark = pytest.mark.timeout(60)


@pytest.mark.process_free
def test_handler_failure_raises_execution_failed_error_and_envelope(store_path):
    @durable_execution(store=store_path, skip_time=True)
    def handler(event, ctx):
        raise ValueError("handler failed")

    with pytest.raises(ExecutionFailedError) as info:
        handler.run({"a": 1})
    assert info.value.error.type == "ValueError"
    assert info.value.error.message == "handler failed"
    assert info.value.error.stack_trace
    envelope = handler({"a": 1})
    assert envelope["Status"] == "FAILED"
    assert envelope["Error"]["ErrorType"] == "ValueError"


@pytest.mark.process_free
def test_envelope_success_is_json(store_path):
    @durable_execution(store=store_path)
    def handler(event, ctx):
        return {"echo": event, "n": ctx.step(lambda _: 41) + 1}

    out = handler({"x": [1, 2]}, None)
    import json
    assert out["Status"] == "SUCCEEDED"
    assert json.loads(out["Result"]) == {"echo": {"x": [1, 2]}, "n": 42}


@pytest.mark.process_free
def test_default_execution_ids_tell_handlers_apart(store_path):
    def make(value):
        @durable_execution
        def handler(event, ctx):  # same qualified name, different module-level identity
            return value
        return handler

    a, b = make("a"), make("b")
    a.func.__module__ = "jobs.alpha"
    b.func.__module__ = "jobs.beta"
    assert a.execution_id_for({"x": 1}) != b.execution_id_for({"x": 1})
    assert a.execution_id_for({"x": 1}) == a.execution_id_for({"x": 1})
    assert a.execution_id_for({"x": 1}) != a.execution_id_for({"x": 2})
    assert (run_skip_time(a, store_path, {"x": 1}), run_skip_time(b, store_path, {"x": 1})) == ("a", "b")
