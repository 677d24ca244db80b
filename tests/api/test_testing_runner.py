"""``durable_mp.testing``: the reference testing SDK's runner, on real executions."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time

import pytest

from durable_mp import (
    DurableContext,
    InvocationStatus,
    StepContext,
    durable_execution,
    durable_step,
    durable_with_child_context,
)
from durable_mp.config import CallbackConfig, CompletionConfig, Duration, ParallelConfig, StepConfig
from durable_mp.exceptions import CallbackExternalError
from durable_mp.lambda_service import ErrorObject, OperationStatus, OperationSubType, OperationType
from durable_mp.retries import RetryPresets
from durable_mp.store.facade import Store
from durable_mp.testing import (
    CallbackOperation,
    ContextOperation,
    DurableChildContextTestRunner,
    DurableFunctionsTestError,
    DurableFunctionTestResult,
    DurableFunctionTestRunner,
    ExecutionStatus,
    StepOperation,
    WaitOperation,
)

pytestmark = pytest.mark.timeout(60)


@durable_step
def add(step_ctx: StepContext, a: int, b: int) -> int:
    return a + b


@durable_execution
def order_handler(event, ctx: DurableContext):
    total = ctx.step(add(event["a"], event["b"]))
    ctx.wait(Duration.from_seconds(30), name="cool-down")

    def branch(i):
        return lambda c: c.step(lambda _: i * total, name=f"times-{i}")

    r = ctx.parallel([branch(1), branch(2)], name="fan")
    return {"total": total, "products": r.get_results()}


def test_run_returns_the_reference_result_shape():
    with DurableFunctionTestRunner(handler=order_handler) as runner:
        res = runner.run(input=json.dumps({"a": 2, "b": 3}))
    cool_down = res.get_wait("cool-down")
    assert cool_down.end_timestamp < cool_down.scheduled_end_timestamp, "skip_time must fast-forward the 30 s wait"
    assert isinstance(res, DurableFunctionTestResult)
    assert res.status is InvocationStatus.SUCCEEDED
    assert res.execution_status is ExecutionStatus.SUCCEEDED
    assert res.error is None
    assert json.loads(res.result) == {"total": 5, "products": [5, 10]}
    assert [op.name for op in res.operations] == ["add", "cool-down", "fan"]

    step = res.get_step("add")
    assert isinstance(step, StepOperation)
    assert step.operation_type is OperationType.STEP and step.sub_type is OperationSubType.STEP
    assert step.status is OperationStatus.SUCCEEDED and step.attempt == 1
    assert step.parent_id is None and step.child_operations == []
    assert step.result == "5", "payloads the reference can encode are its ExtendedTypeSerDes envelope"
    assert isinstance(step.start_timestamp, dt.datetime) and step.end_timestamp >= step.start_timestamp

    wait = res.get_wait("cool-down")
    assert isinstance(wait, WaitOperation) and wait.status is OperationStatus.SUCCEEDED
    assert (wait.scheduled_end_timestamp - wait.start_timestamp).total_seconds() == pytest.approx(30, abs=0.5)

    fan = res.get_context("fan")
    assert isinstance(fan, ContextOperation) and fan.sub_type is OperationSubType.PARALLEL
    assert [b.name for b in fan.child_operations] == ["parallel-branch-0", "parallel-branch-1"]
    b1 = fan.get_context("parallel-branch-1")
    assert b1.parent_id == fan.operation_id and b1.result == "10"
    assert b1.get_step("times-2").parent_id == b1.operation_id
    # the reference's listing order: depth first, last sibling first
    assert [op.name for op in res.get_all_operations()] == [
        "fan", "parallel-branch-1", "times-2", "parallel-branch-0", "times-1", "cool-down", "add"]
    with pytest.raises(DurableFunctionsTestError, match="'nope' not found"):
        res.get_operation_by_name("nope")


@pytest.mark.process_free
def test_input_decoding_and_a_fresh_execution_per_run():
    seen = []

    @durable_execution
    def echo(event, ctx):
        seen.append(event)
        return ctx.step(lambda _: event, name="echo")

    with DurableFunctionTestRunner(echo) as runner:
        assert runner.run().result == "null"
        assert runner.run(input="not json").result == '"not json"'
        assert json.loads(runner.run(input='{"k": [1, 2]}').result) == {"k": [1, 2]}
        assert runner.run(input="7").result == "7"
    assert seen == [None, "not json", {"k": [1, 2]}, 7], "every run executes afresh"


@pytest.mark.process_free
def test_a_failed_handler_gives_status_failed_with_the_error_object():
    @durable_execution
    def failing(event, ctx):
        ctx.step(lambda _: "fine", name="first")
        raise ValueError("handler failed")

    with DurableFunctionTestRunner(failing) as runner:
        res = runner.run(input="{}")
    assert res.status is InvocationStatus.FAILED
    assert res.execution_status is ExecutionStatus.FAILED
    assert res.result is None
    assert isinstance(res.error, ErrorObject)
    assert (res.error.message, res.error.type, res.error.data) == ("handler failed", "ValueError", None)
    assert res.get_step("first").status is OperationStatus.SUCCEEDED


@pytest.mark.process_free
def test_a_result_json_cannot_encode_fails_like_the_reference_envelope():
    @durable_execution
    def handler(event, ctx):
        return {1, 2}

    with DurableFunctionTestRunner(handler) as runner:
        res = runner.run()
    assert res.status is InvocationStatus.FAILED and res.execution_status is ExecutionStatus.FAILED
    assert (res.error.type, res.error.message) == ("TypeError", "Object of type set is not JSON serializable")


@pytest.mark.process_free
def test_failed_step_view_carries_attempts_and_error():
    @durable_execution
    def handler(event, ctx):
        def always(_):
            raise ConnectionError("always")
        ctx.step(always, name="always", config=StepConfig(retry_strategy=RetryPresets.critical()))

    with DurableFunctionTestRunner(handler) as runner:
        res = runner.run()
    step = res.get_step("always")
    assert step.status is OperationStatus.FAILED and step.attempt == 10
    assert (step.error.type, step.error.message) == ("ConnectionError", "always")
    assert res.error.type == "durable_mp.exceptions.StepError" and res.error.message == "always"


@durable_execution
def approval_handler(event, ctx):
    def submit(callback_id, cb_ctx):
        cb_ctx.logger.info("send %s to the reviewer", callback_id)
    answer = ctx.wait_for_callback(submit, name="approval")
    return {"answer": answer}


@pytest.mark.process_free
def test_callback_flow_of_the_reference():
    with DurableFunctionTestRunner(handler=approval_handler) as runner:
        arn = runner.run_async(input="{}")
        cid = runner.wait_for_callback(arn, name="approval")
        runner.send_callback_success(cid, json.dumps({"approved": True}).encode())
        res = runner.wait_for_result(arn)
    assert res.status is InvocationStatus.SUCCEEDED
    assert json.loads(res.result) == {"answer": '{"approved": true}'}, "the callback payload is the raw str"
    ctx_op = res.get_context("approval")
    assert ctx_op.sub_type is OperationSubType.WAIT_FOR_CALLBACK
    cb = ctx_op.get_callback("approval create callback id")
    assert isinstance(cb, CallbackOperation) and cb.callback_id == cid
    assert cb.status is OperationStatus.SUCCEEDED and cb.result == '{"approved": true}'
    assert ctx_op.get_step("approval submitter").status is OperationStatus.SUCCEEDED


def test_callback_created_inside_a_branch_is_found_and_completed():
    @durable_execution
    def handler(event, ctx):
        def branch(c):
            return c.create_callback(name="in-branch").result()
        return ctx.parallel([branch, lambda c: "other"], name="p").get_results()

    with DurableFunctionTestRunner(handler) as runner:
        arn = runner.run_async()
        cid = runner.wait_for_callback(arn, name="in-branch")
        runner.send_callback_success(cid, b"from outside")
        res = runner.wait_for_result(arn)
    assert json.loads(res.result) == ["from outside", "other"]
    cb = res.get_context("p").get_context("parallel-branch-0").get_callback("in-branch")
    assert cb.callback_id == cid and cb.status is OperationStatus.SUCCEEDED


@pytest.mark.process_free
def test_callback_failure_heartbeat_and_lookup_errors():
    @durable_execution
    def handler(event, ctx):
        cb = ctx.create_callback(name="job", config=CallbackConfig(heartbeat_timeout=Duration(1)))
        try:
            return cb.result()
        except CallbackExternalError as exc:
            return [exc.message, exc.error_type]

    with DurableFunctionTestRunner(handler) as runner:
        arn = runner.run_async()
        with pytest.raises(TimeoutError):
            runner.wait_for_callback(arn, name="other", timeout=0.3)
        cid = runner.wait_for_callback(arn, name="job")
        assert runner.wait_for_callback(arn) == cid, "no name: any active callback"
        for _ in range(3):  # 1.5 s in all: alive only thanks to the heartbeats
            time.sleep(0.5)
            runner.send_callback_heartbeat(cid)
        runner.send_callback_failure(cid, ErrorObject("rejected", "Rejected", None, None))
        res = runner.wait_for_result(arn)
        assert json.loads(res.result) == ["rejected", "Rejected"]
        with pytest.raises(ValueError, match="finished without an active callback"):
            runner.wait_for_callback(arn, name="job", timeout=5)
        with pytest.raises(ValueError, match="unknown execution"):
            runner.wait_for_result("arn:nope")


@pytest.mark.process_free
def test_run_timeout_and_deprecated_timeout_argument():
    @durable_execution
    def slow(event, ctx):
        time.sleep(1.0)
        return "late"

    with DurableFunctionTestRunner(slow) as runner:
        with pytest.raises(TimeoutError, match="did not complete"):
            runner.run(execution_timeout=0.2)
        arn = runner.run_async()
        assert runner.wait_for_result(arn, timeout=10).result == '"late"'
        with pytest.warns(DeprecationWarning):
            assert runner.run(timeout=10).status is InvocationStatus.SUCCEEDED
        for run in runner._runs.values():  # the timed-out execution still finishes
            run.done.wait(10)


def test_store_is_temporary_unless_given(tmp_path):
    runner = DurableFunctionTestRunner(order_handler)
    path = runner.store.path
    runner.run(input='{"a": 1, "b": 1}')
    runner.close()
    assert not path.exists(), "close() removes the temporary store"

    given = str(tmp_path / "kept")
    with DurableFunctionTestRunner(order_handler, store=given) as runner:
        arn = runner.run_async(input='{"a": 1, "b": 1}')
        runner.wait_for_result(arn)
    with Store(given) as st:
        assert st.get_execution(arn).status == "SUCCEEDED"
        assert len(st.ops(arn)) == 7  # add, cool-down, fan, 2 branches, 2 steps


def test_batch_result_return_and_history():
    @durable_execution
    def handler(event, ctx):
        cfg = ParallelConfig(completion_config=CompletionConfig.all_completed())
        return ctx.parallel([lambda c: 1, lambda c: 1 / 0], name="p", config=cfg)

    with DurableFunctionTestRunner(handler) as runner:
        arn = runner.run_async()
        res = runner.wait_for_result(arn)
        events = runner.get_execution_history(arn).events
    assert res.status is InvocationStatus.SUCCEEDED
    body = json.loads(res.result)
    assert body["completionReason"] == "ALL_COMPLETED"
    assert [it["status"] for it in body["all"]] == ["SUCCEEDED", "FAILED"]
    kinds = [(e.event_type, e.name) for e in events]
    assert kinds[0][0] == "ExecutionStarted" and kinds[-1][0] == "ExecutionSucceeded"
    assert ("ContextFailed", "parallel-branch-1") in kinds
    assert [e.event_id for e in events] == list(range(1, len(events) + 1))
    done = next(e for e in events if e.event_type == "ContextSucceeded" and e.name == "p")
    assert '"completionReason":{"t":"s","v":"ALL_COMPLETED"}' in done.details["Result"]["Payload"]
    assert done.to_dict()["Name"] == "p"


@durable_with_child_context
def checkout(ctx: DurableContext, item: str, qty: int) -> str:
    price = ctx.step(lambda _: 3 * qty, name="price")
    return f"{qty} x {item} = {price}"


@pytest.mark.process_free
def test_child_context_runner():
    with DurableChildContextTestRunner(checkout, "apple", qty=4) as runner:
        res = runner.run()
    assert res.status is InvocationStatus.SUCCEEDED
    assert json.loads(res.result) == "4 x apple = 12"
    assert res.get_step("price").result == "12"


@pytest.mark.process_free
def test_skip_time_false_really_waits():
    @durable_execution
    def handler(event, ctx):
        ctx.wait(Duration.from_seconds(1), name="w")
        return os.getpid()

    with DurableFunctionTestRunner(handler, skip_time=False) as runner:
        res = runner.run()
    wait = res.get_wait("w")
    assert wait.end_timestamp >= wait.scheduled_end_timestamp, "woke only once the wait was over"
    assert json.loads(res.result) == os.getpid(), "the handler runs in this process"


def test_flat_nesting_shows_no_branch_operations():
    """``NestingType.FLAT`` as the reference defines it: the branches' operations are children of
    the batch operation (no branch CONTEXT operation), their ids still derived from the branch."""
    from durable_mp.config import MapConfig, NestingType

    @durable_execution
    def handler(event, ctx):
        flat = ctx.parallel([lambda c: c.step(lambda _: "one", name="task1"),
                             lambda c: c.step(lambda _: "two", name="task2")],
                            name="flat", config=ParallelConfig(nesting_type=NestingType.FLAT))
        mapped = ctx.map([1, 2], lambda c, item, i, _: c.step(lambda _: item * 10, name=f"m{i}"),
                         name="flat_map", config=MapConfig(nesting_type=NestingType.FLAT))
        nested = ctx.parallel([lambda c: c.step(lambda _: "three", name="task3")], name="nested")
        return flat.get_results() + mapped.get_results() + nested.get_results()

    with DurableFunctionTestRunner(handler=handler) as runner:
        res = runner.run(execution_timeout=60)
    assert json.loads(res.result) == ["one", "two", 10, 20, "three"]
    for name, steps in (("flat", ["task1", "task2"]), ("flat_map", ["m0", "m1"])):
        batch = res.get_context(name)
        # the branches run at once (two workers): their steps may start in either order, as in the reference
        assert sorted((op.operation_type.value, op.name) for op in batch.child_operations) == \
            [(OperationType.STEP.value, step) for step in steps]
        for op in batch.child_operations:
            index = steps.index(op.name)  # the branch the step ran in
            assert op.parent_id == batch.operation_id
            # the id is the one the step has inside its (virtual) branch context
            branch_id = hashlib.blake2b(f"{batch.operation_id}-{index}".encode()).hexdigest()[:64]
            assert op.operation_id == hashlib.blake2b(f"{branch_id}-1".encode()).hexdigest()[:64]
    assert [op.operation_type for op in res.get_context("nested").child_operations] == [OperationType.CONTEXT]


def test_a_branch_may_log_through_its_parents_context():
    """The reference's examples log with the enclosing context inside map functions (threads there);
    the parent's context reaches the worker as a stand-in whose logger works."""

    @durable_execution
    def handler(event, ctx):
        def item(c, value, index, _):
            ctx.logger.info("item %s", value)  # the enclosing context, not c
            return value * 2

        def misuse(c, value, index, _):
            return ctx.step(lambda _: value)

        good = ctx.map([1, 2], item).get_results()
        bad = ctx.map([1], misuse, config=None).all[0].error
        return {"good": good, "bad": [bad.type, "use the context the branch function receives" in bad.message]}

    with DurableFunctionTestRunner(handler=handler) as runner:
        res = runner.run(execution_timeout=60)
    assert json.loads(res.result) == {"good": [2, 4], "bad": ["durable_mp.exceptions.ValidationError", True]}
