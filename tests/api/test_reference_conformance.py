"""Conformance with the reference SDK's observed behaviour (``reference/aws-durable-sdk-api.md``).

One test per behaviour the notes record as observed or verified, written as a user of
the reference would write it, with only the import changed.  Where README's
"Compatibility with the reference SDK" says durable_mp deliberately differs, the test
asserts durable_mp's documented behaviour and says so in its docstring.  Differences
README does not document are ``xfail(strict=True)`` with the reason.

Section numbers (§) refer to the reference notes.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import time

import pytest

from durable_mp import (
    BatchCompletionError,
    BatchItem,
    BatchItemStatus,
    BatchResult,
    ChildContextError,
    CompletionReason,
    DurableContext,
    DurableOperationError,
    ExecutionFailedError,
    InvocationStatus,
    ParallelBranch,
    StepContext,
    StepError,
    durable_execution,
    durable_step,
    durable_with_child_context,
)
from durable_mp.concurrency.models import complete_batch, continue_batch
from durable_mp.config import (
    ChildConfig,
    CompletionConfig,
    Duration,
    MapConfig,
    ParallelConfig,
    StepConfig,
    StepSemantics,
    WaitForCallbackConfig,
)
from durable_mp.engine.driver import DriverState
from durable_mp.exceptions import (
    CallbackError,
    CallbackExternalError,
    CallbackSubmitterError,
    CallbackTimeoutError,
    DurableExecutionsError,
    ExecutionError,
    InvalidStateError,
    InvocationError,
    InvokeError,
    NonDeterministicExecutionError,
    OrphanedChildException,
    RetryableSerDesError,
    SerDesError,
    StepInterruptedError,
    TerminationReason,
    UnrecoverableError,
    ValidationError,
    WaitForConditionError,
)
from durable_mp.lambda_service import (
    ErrorObject,
    OperationAction,
    OperationStatus,
    OperationSubType,
    OperationType,
)
from durable_mp.retries import (
    JitterStrategy,
    LinearRetryStrategyConfig,
    RetryPresets,
    RetryStrategyConfig,
    WithRetryConfig,
    create_linear_retry_strategy,
    create_retry_strategy,
    with_retry,
)
from durable_mp.serdes import ExtendedTypeSerDes, JsonSerDes, SerDesContext
from durable_mp.store.facade import Store
from durable_mp.testing import DurableFunctionTestRunner
from durable_mp.waits import WaitForConditionConfig, WaitForConditionDecision

processes = pytest.mark.timeout(60)


def blake(raw: str) -> str:
    """The reference's operation id: ``blake2b(raw).hexdigest()[:64]``."""
    return hashlib.blake2b(raw.encode()).hexdigest()[:64]


def run_in_runner(handler, input=None):  # noqa: A002 - the reference's parameter name
    with DurableFunctionTestRunner(handler=handler) as runner:
        return runner.run(input=input, execution_timeout=30)


def names_of(result) -> list[tuple]:
    return [(op.operation_type.value, str(op.sub_type), op.name, op.status.value) for op in result.get_all_operations()]


@pytest.fixture
def invocation_ends_at_first_wait(monkeypatch):
    """End the first run at its first ``wait``, as the reference's invocation ends by suspending there.

    The wait's STARTED checkpoint is already written; the run stops with
    ``KeyboardInterrupt`` (the execution stays RUNNING) and the next ``run`` with the same
    execution id replays it, like the reference's next invocation.
    """
    armed = [True]
    original = DriverState.sleep_until

    def sleep_until(self, ts):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt("invocation ends at the wait")
        return original(self, ts)

    monkeypatch.setattr(DriverState, "sleep_until", sleep_until)


# -- §0 import surface ---------------------------------------------------------------------------
PRESENT = {
    "durable_mp": "durable_execution DurableContext StepContext durable_step durable_with_child_context "
                  "durable_parallel_branch BatchResult BatchCompletionError BatchItemStatus CompletionDecision "
                  "CompletionItemStatus CompletionOutcome CompletionStatus ParallelBranch complete_batch "
                  "continue_batch WithRetryConfig __version__",
    "durable_mp.config": "Duration StepConfig StepSemantics ChildConfig ParallelConfig MapConfig NestingType "
                         "CompletionConfig CallbackConfig WaitForCallbackConfig InvokeConfig JitterStrategy",
    "durable_mp.retries": "RetryDecision RetryStrategyConfig LinearRetryStrategyConfig create_retry_strategy "
                          "create_linear_retry_strategy RetryPresets",
    "durable_mp.waits": "WaitForConditionConfig WaitStrategyConfig create_wait_strategy WaitForConditionDecision",
    "durable_mp.serdes": "SerDes SerDesContext JsonSerDes ExtendedTypeSerDes PassThroughSerDes",
    "durable_mp.types": "StepContext WaitForCallbackContext WaitForConditionCheckContext",
    "durable_mp.lambda_service": "ErrorObject OperationType OperationSubType OperationStatus InvocationStatus",
    "durable_mp.execution": "durable_execution",
}
MISSING = {
    "durable_mp": "durable_wait_for_callback with_retry",
    "durable_mp.concurrency.models": "BatchResult BatchItem CompletionReason",
    "durable_mp.execution": "InvocationStatus",
    "durable_mp.context": "durable_step durable_with_child_context durable_parallel_branch durable_wait_for_callback",
    "durable_mp.exceptions": "PluginLoadError OrderedLockError BotoClientError CheckpointError "
                             "GetExecutionStateError SuspendExecution TimedSuspendExecution BackgroundThreadError",
}


def _missing_names(module: str, names: str) -> list[str]:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return names.split()
    return [n for n in names.split() if not hasattr(mod, n)]


@pytest.mark.process_free
@pytest.mark.parametrize("module", sorted(PRESENT))
def test_import_surface(module):
    """§0: the names users import from each public module."""
    assert _missing_names(module, PRESENT[module]) == []


@pytest.mark.process_free
@pytest.mark.parametrize("module", sorted(MISSING))
def test_import_surface_gaps(module):
    """§0/§2/§6: ``durable_wait_for_callback``/``with_retry`` at top level, ``.concurrency.models``,
    ``.execution.InvocationStatus``, decorators importable from ``.context``, and the
    remaining exception classes."""
    assert _missing_names(module, MISSING[module]) == []


# Names the reference's examples suite (packages/aws-durable-execution-sdk-python-examples)
# imports, after renaming its packages to durable_mp (issue 9).
EXAMPLES_SUITE_NAMES = {
    "durable_mp.context": "StepContext WaitForCallbackContext DurableContext durable_step",
    "durable_mp.config": "ParallelBranch NestingType",
    "durable_mp.serdes": "EXTENDED_TYPES_SERDES DEFAULT_JSON_SERDES ExtendedTypeSerDes",
    "durable_mp.lambda_service": "OperationPayload",
    "durable_mp.testing.runner": "DurableFunctionTestRunner DurableFunctionCloudTestRunner DurableFunctionTestResult",
    "durable_mp.filesystem_serdes": "FileSystemSerDes FileSystemSerDesConfig FileSystemSerDesMode",
    "durable_mp.preview": "PreviewConfig PreviewField PreviewMode FieldMatchMode build_preview",
}


@pytest.mark.process_free
@pytest.mark.parametrize("module", sorted(EXAMPLES_SUITE_NAMES))
def test_import_surface_of_the_examples_suite(module):
    assert _missing_names(module, EXAMPLES_SUITE_NAMES[module]) == []


# -- §1 entry point ------------------------------------------------------------------------------
@pytest.mark.process_free
@processes
def test_runner_input_none_and_non_json_strings():
    """§1 / §9.12: ``run()`` without input → event None; a non-JSON string arrives as that string."""
    @durable_execution
    def handler(event, ctx):
        return {"event": event}

    assert json.loads(run_in_runner(handler).result) == {"event": None}
    assert json.loads(run_in_runner(handler, "plain text").result) == {"event": "plain text"}
    assert json.loads(run_in_runner(handler, '{"a": 1}').result) == {"event": {"a": 1}}
    # a dict is JSON-encoded as the reference runner does: the handler sees JSON's view of it
    assert json.loads(run_in_runner(handler, {"a": (1, 2)}).result) == {"event": {"a": [1, 2]}}


@pytest.mark.process_free
@processes
def test_result_is_plain_json_dumps_of_the_return_value():
    """§1: the envelope's Result is ``json.dumps(result)`` (plain JSON, not SerDes)."""
    value = {"a": [1, 2.5, "x"], "b": None, "c": True}

    @durable_execution
    def handler(event, ctx):
        return value

    res = run_in_runner(handler, "{}")
    assert res.status is InvocationStatus.SUCCEEDED
    assert res.result == json.dumps(value)


@pytest.mark.process_free
@processes
def test_uncaught_error_fails_the_execution_with_its_error_object():
    """§6 observed: ``ValueError("handler failed")`` → FAILED, ``ErrorObject(message='handler failed',
    type='ValueError', data=None, ...)``.  Deliberate difference (docs/compatibility.md): ``stack_trace``
    keeps the traceback instead of ``None``."""
    @durable_execution
    def handler(event, ctx):
        raise ValueError("handler failed")

    res = run_in_runner(handler, "{}")
    assert res.status is InvocationStatus.FAILED
    assert (res.error.message, res.error.type, res.error.data) == ("handler failed", "ValueError", None)
    assert any("handler failed" in line for line in res.error.stack_trace)


@processes
def test_returning_a_batch_result_from_the_handler():
    """§9.2: the reference FAILS with ``TypeError: Object of type BatchResult is not JSON serializable``.
    Deliberate difference (docs/compatibility.md): the envelope serializes it with ``to_dict()``."""
    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([lambda c: "a", lambda c: "b"])

    res = run_in_runner(handler, "{}")
    assert res.status is InvocationStatus.SUCCEEDED
    assert json.loads(res.result) == {
        "all": [{"index": 0, "status": "SUCCEEDED", "result": "a", "error": None},
                {"index": 1, "status": "SUCCEEDED", "result": "b", "error": None}],
        "completionReason": "ALL_COMPLETED"}


# -- §2 DurableContext ---------------------------------------------------------------------------
@durable_step
def work(step_ctx: StepContext, i: int) -> dict:
    return {"branch": i, "attempt": step_ctx.attempt}


def plain_step(step_ctx):
    return "plain"


def map_item(ctx, item, index, inputs):
    return item


@processes
def test_operation_names():
    """§2 / §9.8: a decorated step is named by its function; a lambda gets no name;
    ``parallel`` never derives names (branches are ``parallel-branch-{i}`` or the
    ``ParallelBranch`` name), ``map`` only from a decorator's ``_original_name``.
    Deliberate difference (docs/compatibility.md): a plain function's step is named by ``__name__``."""
    @durable_execution
    def handler(event, ctx):
        ctx.step(work(1))
        ctx.step(lambda _: 1)
        ctx.step(plain_step)
        ctx.parallel([lambda c: 1, ParallelBranch(lambda c: 2, name="second")])
        ctx.map([1], map_item)
        return "ok"

    ops = [(op.name, str(op.sub_type)) for op in run_in_runner(handler).get_all_operations()]
    assert sorted(ops, key=str) == sorted([
        ("work", "Step"), (None, "Step"), ("plain_step", "Step"),
        (None, "Parallel"), ("parallel-branch-0", "ParallelBranch"), ("second", "ParallelBranch"),
        (None, "Map"), ("map-item-0", "MapIteration")], key=str)


@pytest.mark.process_free
@processes
def test_wait_for_callback_operation_names_without_a_name():
    """§2: ``wait_for_callback`` without a name records CALLBACK ``create callback id`` and STEP ``submitter``."""
    @durable_execution
    def handler(event, ctx):
        return ctx.wait_for_callback(lambda callback_id, cb_ctx: None)

    with DurableFunctionTestRunner(handler) as runner:
        arn = runner.run_async()
        runner.send_callback_success(runner.wait_for_callback(arn), b"yes")
        res = runner.wait_for_result(arn)
    assert json.loads(res.result) == "yes"
    assert names_of(res) == [
        ("CONTEXT", "WaitForCallback", None, "SUCCEEDED"),
        ("STEP", "Step", "submitter", "SUCCEEDED"),
        ("CALLBACK", "Callback", "create callback id", "SUCCEEDED"),
    ]


@pytest.mark.process_free
@processes
def test_wait_shorter_than_a_second_is_a_validation_error():
    """§2 / §9.14: ``Duration`` is whole seconds (``from_seconds(1.5)`` → 1) and ``wait`` < 1 s raises
    ``ValidationError`` before anything is recorded."""
    assert Duration.from_seconds(1.5).to_seconds() == 1
    assert Duration.from_minutes(1.5).to_seconds() == 90

    @durable_execution
    def handler(event, ctx):
        try:
            ctx.wait(Duration.from_seconds(0.5), name="too-short")
        except ValidationError:
            return "rejected"
        return "accepted"

    res = run_in_runner(handler)
    assert json.loads(res.result) == "rejected"
    assert res.operations == []


@pytest.mark.process_free
@processes
def test_with_retry_backs_off_with_named_waits_in_a_child_context():
    """§2: ``with_retry`` re-runs a block, backing off with ``ctx.wait(name=f"{name}-backoff-{attempt}")``
    inside a ``run_in_child_context``; the final failure raises ``ChildContextError``."""
    strategy = create_retry_strategy(RetryStrategyConfig(max_attempts=3, initial_delay=Duration(2),
                                                         jitter_strategy=JitterStrategy.NONE))

    @durable_execution
    def handler(event, ctx):
        def block(c, attempt):
            c.step(lambda _: attempt, name=f"try-{attempt}")
            if attempt < event["succeed_at"]:
                raise RuntimeError(f"attempt {attempt}")
            return attempt
        try:
            return with_retry(ctx, block, WithRetryConfig(retry_strategy=strategy), name="blk")
        except ChildContextError as exc:
            return [exc.message, exc.error_type]

    res = run_in_runner(handler, '{"succeed_at": 3}')
    assert json.loads(res.result) == 3
    blk = res.get_context("blk")
    assert blk.sub_type is OperationSubType.RUN_IN_CHILD_CONTEXT
    assert [c.name for c in blk.child_operations] == ["try-1", "blk-backoff-1", "try-2", "blk-backoff-2", "try-3"]
    assert json.loads(run_in_runner(handler, '{"succeed_at": 9}').result) == ["attempt 3", "RuntimeError"]


@pytest.mark.process_free
@processes
def test_wait_for_condition_is_one_step_polled_until_the_strategy_stops():
    """§2: ``wait_for_condition`` records one STEP/``WaitForCondition`` and returns the final state."""
    @durable_execution
    def handler(event, ctx):
        cfg = WaitForConditionConfig(
            wait_strategy=lambda state, attempt: (WaitForConditionDecision.stop_polling() if state >= 3
                                                  else WaitForConditionDecision.continue_waiting(Duration(5))),
            initial_state=0)
        return ctx.wait_for_condition(lambda state, check_ctx: state + 1, cfg, name="poll")

    res = run_in_runner(handler)
    assert json.loads(res.result) == 3
    op = res.get_step("poll")
    assert (op.operation_type, op.sub_type, op.status) == (
        OperationType.STEP, OperationSubType.WAIT_FOR_CONDITION, OperationStatus.SUCCEEDED)


@durable_with_child_context
def priced(ctx: DurableContext, qty: int) -> int:
    price = ctx.step(lambda _: 3, name="price")
    if qty < 0:
        raise ValueError("negative quantity")
    return price * qty


@pytest.mark.process_free
@processes
def test_run_in_child_context_names_results_and_failures():
    """§2: ``run_in_child_context`` records CONTEXT/``RunInChildContext`` named by the decorator,
    returns the function's result, and a failure is FAILED and raises ``ChildContextError``
    with the escaping error's type and a rebuilt ``DurableOperationError`` cause."""
    @durable_execution
    def handler(event, ctx):
        total = ctx.run_in_child_context(priced(4))
        try:
            ctx.run_in_child_context(priced(-1), name="refund")
        except ChildContextError as exc:
            return [total, exc.message, exc.error_type, type(exc.__cause__).__name__]

    res = run_in_runner(handler)
    assert json.loads(res.result) == [12, "negative quantity", "ValueError", "DurableOperationError"]
    ok, failed = res.get_context("priced"), res.get_context("refund")
    assert (ok.sub_type, ok.status) == (OperationSubType.RUN_IN_CHILD_CONTEXT, OperationStatus.SUCCEEDED)
    assert ok.get_step("price").parent_id == ok.operation_id
    assert failed.status is OperationStatus.FAILED and failed.error.type == "ValueError"


@durable_execution
def virtual_child_handler(event, ctx):
    return ctx.run_in_child_context(lambda c: c.step(lambda _: 3, name="inner"), name="virt",
                                    config=ChildConfig(is_virtual=True))


@pytest.mark.process_free
@processes
def test_virtual_child_context_records_nothing_of_its_own():
    """§2 / §5: ``ChildConfig(is_virtual=True)`` checkpoints no CONTEXT op; the ids of its
    operations are still prefixed by its (virtual) id."""
    res = run_in_runner(virtual_child_handler)
    assert json.loads(res.result) == 3
    assert [op.name for op in res.get_all_operations()] == ["inner"]
    assert res.get_step("inner").operation_id == blake(f"{blake('1')}-1")


@pytest.mark.process_free
@processes
def test_wait_for_callback_submitter_failure():
    """§2: a failing submitter step raises ``CallbackSubmitterError`` (fields of the escaping error)."""
    @durable_execution
    def handler(event, ctx):
        def submit(callback_id, cb_ctx):
            raise RuntimeError("cannot submit")
        try:
            ctx.wait_for_callback(submit, name="x", config=WaitForCallbackConfig(retry_strategy=RetryPresets.none()))
        except CallbackSubmitterError as exc:
            return [exc.message, exc.error_type]

    res = run_in_runner(handler)
    assert json.loads(res.result) == ["cannot submit", "RuntimeError"]
    assert res.get_context("x").get_step("x submitter").status is OperationStatus.FAILED


@pytest.mark.process_free
@processes
def test_execution_context_carries_the_execution_arn():
    """§2: ``context.execution_context.durable_execution_arn`` is the execution's ARN."""
    @durable_execution
    def handler(event, ctx):
        return ctx.execution_context.durable_execution_arn

    with DurableFunctionTestRunner(handler) as runner:
        arn = runner.run_async()
        assert json.loads(runner.wait_for_result(arn).result) == arn


@pytest.mark.process_free
@processes
def test_logger_is_quiet_while_replaying(store_path, caplog, invocation_ends_at_first_wait):
    """§2: ``ctx.logger`` is suppressed while the context replays and adds ``executionArn`` etc."""
    caplog.set_level(logging.INFO, logger="durable_mp")

    @durable_execution
    def handler(event, ctx):
        ctx.logger.info("before")
        ctx.step(lambda _: 1, name="a")
        ctx.wait(Duration.from_seconds(5), name="w")
        ctx.logger.info("after")
        return "done"

    with pytest.raises(KeyboardInterrupt):
        handler.run({}, store=store_path, execution_id="logs", skip_time=True)
    first = [r.getMessage() for r in caplog.records if r.name == "durable_mp"]
    caplog.clear()
    handler.run({}, store=store_path, execution_id="logs", skip_time=True)
    second = [r for r in caplog.records if r.name == "durable_mp"]
    assert first == ["before"]
    assert [r.getMessage() for r in second] == ["after"]
    assert second[0].executionArn == "logs"


def at_most_once_body(step_ctx):
    RAN.append(step_ctx.attempt)
    if len(RAN) == 1:
        raise KeyboardInterrupt("the invocation dies inside the step")
    return "second attempt"


RAN: list = []


@pytest.mark.process_free
@processes
@pytest.mark.parametrize("semantics", ["AT_MOST_ONCE_PER_RETRY", "AT_LEAST_ONCE_PER_RETRY"])
def test_step_semantics_after_an_interrupted_attempt(store_path, semantics):
    """§3: AT_LEAST_ONCE re-runs an interrupted attempt on the next invocation; AT_MOST_ONCE does
    not re-run it but hands ``StepInterruptedError`` to the retry strategy (here: no retry)."""
    RAN.clear()

    @durable_execution
    def handler(event, ctx):
        cfg = StepConfig(retry_strategy=RetryPresets.none(), step_semantics=StepSemantics[semantics])
        try:
            return ctx.step(at_most_once_body, name="charge", config=cfg)
        except StepError as exc:
            return exc.error_type

    with pytest.raises(KeyboardInterrupt):
        handler.run({}, store=store_path, execution_id="once", skip_time=True)
    out = handler.run({}, store=store_path, execution_id="once", skip_time=True)
    if semantics == "AT_MOST_ONCE_PER_RETRY":
        assert out.endswith("StepInterruptedError") and RAN == [1]
    else:
        assert out == "second attempt" and len(RAN) == 2


@pytest.mark.process_free
@processes
def test_operation_errors_are_identical_on_replay(store_path, invocation_ends_at_first_wait):
    """§6: an operation error is rebuilt from its checkpoint, identically on the first run and replay."""
    @durable_execution
    def handler(event, ctx):
        def fail(_):
            raise KeyError("gone")
        try:
            ctx.step(fail, name="f", config=StepConfig(retry_strategy=RetryPresets.none()))
        except StepError as exc:
            seen = [type(exc).__name__, exc.message, exc.error_type, type(exc.__cause__).__name__,
                    exc.__cause__.message]
        ctx.wait(Duration.from_seconds(5))
        return seen

    with pytest.raises(KeyboardInterrupt):
        handler.run({}, store=store_path, execution_id="errs", skip_time=True)
    replayed = handler.run({}, store=store_path, execution_id="errs", skip_time=True)
    assert replayed == ["StepError", "'gone'", "KeyError", "DurableOperationError", "'gone'"]


# -- §3 configuration ------------------------------------------------------------------------------
@pytest.mark.process_free
def test_completion_config_factories_defaults_and_validation():
    """§3: factories, the two different defaults (§9.4), and ``ValidationError`` for bad values."""
    assert CompletionConfig.first_successful() == CompletionConfig(min_successful=1)
    assert CompletionConfig.all_completed() == CompletionConfig(tolerated_failure_percentage=100)
    assert CompletionConfig.all_successful() == CompletionConfig(tolerated_failure_count=0,
                                                                 tolerated_failure_percentage=0)
    assert ParallelConfig().completion_config == CompletionConfig.all_successful()
    assert MapConfig().completion_config == CompletionConfig()
    for bad in (dict(min_successful=0), dict(tolerated_failure_count=-1), dict(tolerated_failure_percentage=101),
                dict(tolerated_failure_percentage=-1),
                dict(min_successful=1, should_complete=lambda status: continue_batch())):
        with pytest.raises(ValidationError):
            CompletionConfig(**bad)
    with pytest.raises(ValidationError):
        StepConfig(sub_type="has space")
    with pytest.raises(ValidationError):
        StepConfig(sub_type="x" * 33)
    assert StepConfig(sub_type="A-z_0" * 6 + "ab").sub_type


@pytest.mark.process_free
@processes
def test_max_concurrency_below_one_is_an_error():
    """§3: ``max_concurrency < 1`` → error (a ``ValidationError``)."""
    @durable_execution
    def handler(event, ctx):
        try:
            ctx.map([1, 2], map_item, config=MapConfig(max_concurrency=0))
        except ValidationError:
            return "rejected"
        return "accepted"

    assert json.loads(run_in_runner(handler).result) == "rejected"


@pytest.mark.process_free
def test_retry_delay_formula():
    """§3: no retry once ``attempts_made >= max_attempts`` or the error does not match;
    delay = ``min(initial * rate**(attempts_made-1), max)``, jittered, ``max(1, ceil(..))``."""
    strategy = create_retry_strategy(RetryStrategyConfig(
        max_attempts=5, initial_delay=Duration(2), max_delay=Duration(10), backoff_rate=3,
        jitter_strategy=JitterStrategy.NONE))
    decisions = [strategy(RuntimeError("x"), n) for n in range(1, 6)]
    assert [(d.should_retry, d.delay_seconds) for d in decisions] == [
        (True, 2), (True, 6), (True, 10), (True, 10), (False, 0)]
    tiny = create_retry_strategy(RetryStrategyConfig(initial_delay=Duration(0), jitter_strategy=JitterStrategy.NONE))
    assert tiny(RuntimeError(), 1).delay_seconds == 1, "delays < 1 s are raised to 1 s"
    full = create_retry_strategy(RetryStrategyConfig(initial_delay=Duration(8), jitter_strategy=JitterStrategy.FULL))
    half = create_retry_strategy(RetryStrategyConfig(initial_delay=Duration(8), jitter_strategy=JitterStrategy.HALF))
    assert {full(RuntimeError(), 1).delay_seconds for _ in range(200)} <= set(range(1, 9))
    assert {half(RuntimeError(), 1).delay_seconds for _ in range(200)} <= set(range(4, 9))

    by_text = create_retry_strategy(RetryStrategyConfig(retryable_errors=["timeout", re.compile(r"^5\d\d")]))
    assert by_text(RuntimeError("read timeout"), 1).should_retry
    assert by_text(RuntimeError("503 busy"), 1).should_retry
    assert not by_text(RuntimeError("404"), 1).should_retry
    by_type = create_retry_strategy(RetryStrategyConfig(retryable_error_types=[ConnectionError]))
    assert by_type(ConnectionResetError(), 1).should_retry and not by_type(ValueError(), 1).should_retry

    linear = create_linear_retry_strategy(LinearRetryStrategyConfig(jitter_strategy=JitterStrategy.NONE))
    assert [linear(RuntimeError(), n).delay_seconds for n in range(1, 7)] == [1, 2, 3, 4, 5, 0]


@pytest.mark.process_free
def test_retry_presets():
    """§3: presets' attempt counts and deterministic delays (``critical``, ``linear``, ``fixed``)."""
    def attempts(strategy):
        n = 1
        while strategy(RuntimeError(), n).should_retry:
            n += 1
        return n

    assert [attempts(p) for p in (RetryPresets.none(), RetryPresets.default(), RetryPresets.transient(),
                                  RetryPresets.resource_availability(), RetryPresets.critical(),
                                  RetryPresets.linear(), RetryPresets.fixed())] == [1, 6, 3, 5, 10, 6, 5]
    critical = RetryPresets.critical()
    assert [critical(RuntimeError(), n).delay_seconds for n in range(1, 5)] == [1, 2, 3, 4]
    assert [RetryPresets.linear()(RuntimeError(), n).delay_seconds for n in range(1, 4)] == [1, 2, 3]
    assert RetryPresets.fixed(Duration(7))(RuntimeError(), 3).delay_seconds == 7
    assert {RetryPresets.default()(RuntimeError(), 5).delay_seconds for _ in range(100)} <= set(range(1, 61))


@pytest.mark.process_free
@processes
def test_default_step_strategy_is_six_attempts_and_step_error_fields():
    """§9.11 / §6 observed: without a strategy a step runs 6 times (``RetryPresets.default()``); the
    caught failure is ``StepError(message='always', error_type='ConnectionError')`` whose
    ``__cause__`` is a rebuilt ``DurableOperationError``.  Deliberate difference (docs/compatibility.md):
    retries sleep in place (``skip_time`` makes it instant) instead of suspending."""
    @durable_execution
    def handler(event, ctx):
        def always(step_ctx):
            raise ConnectionError("always")
        try:
            ctx.step(always, name="always")
        except StepError as exc:
            return [exc.message, exc.error_type, type(exc.__cause__).__name__, exc.__cause__.error_type]

    res = run_in_runner(handler)
    assert json.loads(res.result) == ["always", "ConnectionError", "DurableOperationError", "ConnectionError"]
    step = res.get_step("always")
    assert (step.status, step.attempt) == (OperationStatus.FAILED, 6)


@pytest.mark.process_free
def test_extended_type_serdes_envelope():
    """§3 / §8 listing: ``ExtendedTypeSerDes`` writes primitives and lists of primitives as compact
    JSON and everything else as the ``{"t","v"}`` envelope; unsupported types → ``SerDesError``.
    (Deliberate difference, README: durable_mp's *default* serdes is pickle.)"""
    serdes, ctx = ExtendedTypeSerDes(), SerDesContext()
    assert serdes.serialize("5 6", ctx) == '"5 6"'
    assert serdes.serialize([1, 2], ctx) == "[1,2]"
    # the recorded branch result of §8, first 60 characters
    assert serdes.serialize({"branch": 2, "attempt": 1}, ctx)[:60] == \
        '{"t":"m","v":{"branch":{"t":"i","v":2},"attempt":{"t":"i","v'
    assert serdes.deserialize(serdes.serialize((1, "a"), ctx), ctx) == (1, "a")

    class Custom:
        pass

    with pytest.raises(SerDesError, match="Unsupported type"):
        serdes.serialize(Custom(), ctx)
    with pytest.raises(SerDesError):
        serdes.serialize({(1, 2): 3}, ctx)


@pytest.mark.process_free
@processes
def test_serdes_failure_is_permanent():
    """§3: a serialization failure fails the step without retry and surfaces as ``SerDesError``, not
    ``StepError``.  (Custom classes pickle in durable_mp, README; a generator does not.)"""
    @durable_execution
    def handler(event, ctx):
        try:
            ctx.step(lambda _: (i for i in range(3)), name="unpicklable")
        except StepError:
            return "StepError"
        except SerDesError:
            return "SerDesError"

    res = run_in_runner(handler)
    assert json.loads(res.result) == "SerDesError"
    assert res.get_step("unpicklable").attempt == 1


@pytest.mark.process_free
@processes
def test_results_are_round_tripped_even_on_the_first_run():
    """§3: a step's result is serialized and deserialized before it is returned."""
    original = {"nested": [1, 2]}

    @durable_execution
    def handler(event, ctx):
        value = ctx.step(lambda _: original, name="s")
        return [value == original, value is original, value["nested"] is original["nested"]]

    assert json.loads(run_in_runner(handler).result) == [True, False, False]


@processes
def test_item_serdes_or_serdes_encode_branch_results():
    """§3: branch results use ``item_serdes or serdes``."""
    @durable_execution
    def handler(event, ctx):
        ctx.map([1, 2], map_item, name="json", config=MapConfig(serdes=JsonSerDes()))
        ctx.map([1, 2], map_item, name="ext", config=MapConfig(serdes=JsonSerDes(), item_serdes=ExtendedTypeSerDes()))
        return ctx.map([{"k": 1}], map_item, config=MapConfig(item_serdes=JsonSerDes())).get_results()

    res = run_in_runner(handler)
    assert json.loads(res.result) == [{"k": 1}]
    assert [op.result for op in res.get_context("json").child_operations] == ["1", "2"]
    assert [op.result for op in res.get_context("ext").child_operations] == ["1", "2"]


# -- §4 BatchResult --------------------------------------------------------------------------------
@pytest.mark.process_free
def test_batch_result_api():
    """§4: methods, counts, status rules, ``to_dict`` and ``throw_if_error``.  Deliberate difference
    (README): ``successful_results`` / ``failed_results`` exist (§9.1: absent in the reference)."""
    err = ErrorObject("boom", "ValueError", None, None)
    r = BatchResult([BatchItem(2, BatchItemStatus.STARTED), BatchItem(0, BatchItemStatus.SUCCEEDED, "a"),
                     BatchItem(1, BatchItemStatus.FAILED, None, err)], CompletionReason.ALL_COMPLETED)
    assert [it.index for it in r.all] == [0, 1, 2]
    assert r.get_results() == ["a"] and r.get_errors() == [err]
    assert [len(r.succeeded()), len(r.failed()), len(r.started())] == [1, 1, 1]
    assert (r.success_count, r.failure_count, r.started_count, r.total_count) == (1, 1, 1, 3)
    assert r.status is BatchItemStatus.FAILED and r.has_failure
    assert r.successful_results == ["a"] and [it.index for it in r.failed_results] == [1]
    assert r.to_dict() == {"all": [
        {"index": 0, "status": "SUCCEEDED", "result": "a", "error": None},
        {"index": 1, "status": "FAILED", "result": None, "error": {"ErrorMessage": "boom", "ErrorType": "ValueError"}},
        {"index": 2, "status": "STARTED", "result": None, "error": None}], "completionReason": "ALL_COMPLETED"}
    assert BatchResult.from_dict(r.to_dict()) == r
    with pytest.raises(ChildContextError) as info:
        r.throw_if_error()
    assert (info.value.message, info.value.error_type) == ("boom", "ValueError")
    assert type(info.value.__cause__) is DurableOperationError

    ok = [BatchItem(0, BatchItemStatus.SUCCEEDED, 1)]
    assert BatchResult(ok + [BatchItem(1, BatchItemStatus.FAILED, None, err)],
                       CompletionReason.CUSTOM_COMPLETION_SUCCEEDED).status is BatchItemStatus.SUCCEEDED
    custom_failed = BatchResult(ok, CompletionReason.CUSTOM_COMPLETION_FAILED)
    assert custom_failed.status is BatchItemStatus.FAILED
    with pytest.raises(BatchCompletionError):
        custom_failed.throw_if_error()
    with pytest.raises(ChildContextError, match=r"^Batch item 3 failed without an ErrorObject\.$"):
        BatchResult([BatchItem(3, BatchItemStatus.FAILED)], CompletionReason.ALL_COMPLETED).throw_if_error()
    BatchResult(ok, CompletionReason.ALL_COMPLETED).throw_if_error()  # nothing to raise


# -- §5 semantics ----------------------------------------------------------------------------------
@processes
def test_results_ordered_by_index_not_completion():
    """§5: ``all`` and ``get_results()`` follow branch index, never completion order."""
    @durable_execution
    def handler(event, ctx):
        def make(i):
            def branch(c):
                time.sleep(0.1 * (2 - i))
                return i
            return branch
        r = ctx.parallel([make(i) for i in range(3)], config=ParallelConfig(max_concurrency=3))
        return [[it.index for it in r.all], r.get_results()]

    assert json.loads(run_in_runner(handler).result) == [[0, 1, 2], [0, 1, 2]]


def _ended(name):
    """Leave a trace that a sleepy branch ran to its end (early completion should terminate it first)."""
    if os.environ.get("SLEEPY_MARKERS"):
        open(os.path.join(os.environ["SLEEPY_MARKERS"], name), "w").close()


def sleepy_b0(ctx):
    time.sleep(3)
    _ended("b0")
    return "b0"


def quick_b1(ctx):
    time.sleep(0.1)
    return "b1-second"


def sleepy_b2(ctx):
    time.sleep(3)
    _ended("b2")
    return "b2"


@processes
def test_first_successful_recorded_run(tmp_path, monkeypatch):
    """§5 recorded: ``items [[0,"STARTED",null],[1,"SUCCEEDED","b1-second"],[2,"STARTED",null]]``,
    ``MIN_SUCCESSFUL_REACHED``, ``SUCCEEDED``; the unfinished branches' ops stay STARTED.
    Deliberate difference (docs/compatibility.md, §9.6): the still-running branches are terminated, so the
    run does not wait for them (the reference joins its threads)."""
    @durable_execution
    def handler(event, ctx):
        cfg = ParallelConfig(max_concurrency=3, completion_config=CompletionConfig.first_successful())
        r = ctx.parallel([sleepy_b0, quick_b1, sleepy_b2], config=cfg)
        return {"items": [[it.index, it.status.value, it.result] for it in r.all],
                "reason": r.completion_reason.value, "status": r.status.value}

    monkeypatch.setenv("SLEEPY_MARKERS", str(tmp_path))
    res = run_in_runner(handler, "{}")
    assert list(tmp_path.iterdir()) == [], "terminated, not awaited"  # their workers are gone by now
    assert json.loads(res.result) == {"items": [[0, "STARTED", None], [1, "SUCCEEDED", "b1-second"],
                                                [2, "STARTED", None]],
                                      "reason": "MIN_SUCCESSFUL_REACHED", "status": "SUCCEEDED"}
    branches = {op.name: op.status for op in res.operations[0].child_operations}
    assert branches == {"parallel-branch-0": OperationStatus.STARTED,
                        "parallel-branch-1": OperationStatus.SUCCEEDED,
                        "parallel-branch-2": OperationStatus.STARTED}


def failing_branch(ctx):
    raise ValueError("nope")


@processes
def test_first_successful_with_every_branch_failing():
    """§5 verified: all branches failing under ``first_successful`` → ``["FAILED","ALL_COMPLETED",2]``."""
    @durable_execution
    def handler(event, ctx):
        cfg = ParallelConfig(completion_config=CompletionConfig.first_successful())
        r = ctx.parallel([failing_branch, failing_branch], config=cfg)
        return [r.status.value, r.completion_reason.value, r.total_count]

    assert json.loads(run_in_runner(handler).result) == ["FAILED", "ALL_COMPLETED", 2]


@processes
def test_custom_completion_failed_and_throw_if_error_prefers_the_failed_item():
    """§5: ``should_complete`` returning ``complete_batch(FAILED)`` on the first failure →
    ``FAILED / CUSTOM_COMPLETION_FAILED``; ``throw_if_error()`` raises ``ChildContextError``."""
    from durable_mp import CompletionOutcome

    def on_failure(status):
        return complete_batch(CompletionOutcome.FAILED) if status.failure_count else continue_batch()

    @durable_execution
    def handler(event, ctx):
        cfg = ParallelConfig(max_concurrency=1, completion_config=CompletionConfig(should_complete=on_failure))
        r = ctx.parallel([lambda c: "ok", failing_branch, lambda c: "never"], config=cfg)
        try:
            r.throw_if_error()
        except Exception as exc:  # noqa: BLE001 - the type is what is checked
            raised = type(exc).__name__
        return [r.status.value, r.completion_reason.value, raised]

    assert json.loads(run_in_runner(handler).result) == ["FAILED", "CUSTOM_COMPLETION_FAILED", "ChildContextError"]


def fatal_branch(ctx):
    raise NonDeterministicExecutionError("fatal in branch", step_id="x")


@processes
def test_execution_errors_escape_the_batch():
    """§5: a branch that raises an ``ExecutionError`` (e.g. non-determinism) does not become a FAILED
    item: the error escapes the batch and fails the execution."""
    @durable_execution
    def handler(event, ctx):
        cfg = ParallelConfig(completion_config=CompletionConfig.all_completed())
        return [it.status.value for it in ctx.parallel([fatal_branch, lambda c: 1], config=cfg).all]

    res = run_in_runner(handler)
    assert res.status is InvocationStatus.FAILED
    assert res.error.message == "fatal in branch"
    assert res.error.type.endswith("NonDeterministicExecutionError")


@processes
def test_a_failing_branch_is_a_failed_context_op_and_item():
    """§5 / §9.3: the branch CONTEXT op is FAILED with ``ErrorObject.from_exception(e)``, the item
    carries the same fields, the Parallel op is SUCCEEDED and nothing is raised."""
    @durable_execution
    def handler(event, ctx):
        r = ctx.parallel([lambda c: "fine", failing_branch], name="p")
        return {"error": r.all[1].error.to_dict(), "status": r.status.value}

    res = run_in_runner(handler)
    out = json.loads(res.result)
    branch = res.get_context("p").get_context("parallel-branch-1")
    assert res.get_context("p").status is OperationStatus.SUCCEEDED
    assert branch.status is OperationStatus.FAILED
    assert (branch.error.type, branch.error.message) == ("ValueError", "nope")
    assert ErrorObject.from_dict(out["error"]) == branch.error
    assert out["status"] == "FAILED"


@processes
def test_a_failed_step_inside_a_branch_surfaces_as_step_error():
    """§5: the branch's error type is the SDK's ``StepError`` (the reference's own module path,
    here ``durable_mp.exceptions.StepError``); the step op itself records ``KeyError``."""
    @durable_execution
    def handler(event, ctx):
        def branch(c):
            return c.step(lambda _: {}["missing"], name="lookup",
                          config=StepConfig(retry_strategy=RetryPresets.none()))
        return ctx.parallel([branch], name="p", config=ParallelConfig(
            completion_config=CompletionConfig.all_completed())).all[0].error.type

    res = run_in_runner(handler)
    assert json.loads(res.result) == "durable_mp.exceptions.StepError"
    step = res.get_context("p").get_context("parallel-branch-0").get_step("lookup")
    assert (step.status, step.error.type) == (OperationStatus.FAILED, "KeyError")


def fail_at_one(ctx, item, index, inputs):
    if item == 1:
        raise RuntimeError("item 1")
    return item


@processes
def test_map_default_is_fail_fast_and_omits_never_started_items():
    """§5 observed / §9.5: ``map`` without config, one failing item, ``max_concurrency=1`` →
    ``FAILED / FAILURE_TOLERANCE_EXCEEDED``, items ``[0 SUCCEEDED, 1 FAILED]``, 2 and 3 omitted."""
    @durable_execution
    def handler(event, ctx):
        r = ctx.map([0, 1, 2, 3], fail_at_one, config=MapConfig(max_concurrency=1))
        return [r.status.value, r.completion_reason.value, [[it.index, it.status.value] for it in r.all],
                r.total_count]

    assert json.loads(run_in_runner(handler).result) == [
        "FAILED", "FAILURE_TOLERANCE_EXCEEDED", [[0, "SUCCEEDED"], [1, "FAILED"]], 2]


def fail_late(ctx):
    time.sleep(0.5)
    raise ValueError("late")


@processes
def test_parallel_default_is_all_successful():
    """§5 observed: ``parallel`` default (all_successful) with a failing branch → FAILED, the
    other branches SUCCEEDED.  The reference (since Dec 2025) says FAILURE_TOLERANCE_EXCEEDED;
    docs/architecture.md "Completion" lets running branches finish and reads the reason from the final state: every
    branch ran to an end, so ALL_COMPLETED (the blog post's output)."""
    @durable_execution
    def handler(event, ctx):
        r = ctx.parallel([lambda c: 0, fail_late, lambda c: 2], config=ParallelConfig(max_concurrency=3))
        return [r.status.value, r.completion_reason.value, [it.status.value for it in r.all]]

    assert json.loads(run_in_runner(handler).result) == [
        "FAILED", "ALL_COMPLETED", ["SUCCEEDED", "FAILED", "SUCCEEDED"]]


@processes
def test_tolerated_failure_count_gives_failed_all_completed():
    """§5 observed / §9.3: ``CompletionConfig(tolerated_failure_count=1)`` with one failure →
    ``FAILED / ALL_COMPLETED`` while the Map op is SUCCEEDED."""
    @durable_execution
    def handler(event, ctx):
        cfg = MapConfig(completion_config=CompletionConfig(tolerated_failure_count=1))
        r = ctx.map([0, 1, 2], fail_at_one, name="m", config=cfg)
        return [r.status.value, r.completion_reason.value, [it.status.value for it in r.all]]

    res = run_in_runner(handler)
    assert json.loads(res.result) == ["FAILED", "ALL_COMPLETED", ["SUCCEEDED", "FAILED", "SUCCEEDED"]]
    assert res.get_context("m").status is OperationStatus.SUCCEEDED


@processes
def test_map_over_nothing_and_min_successful_above_the_item_count():
    """§9.15: ``map([])`` → ``SUCCEEDED / ALL_COMPLETED`` with no items; ``min_successful > len(inputs)``
    → ``ValidationError`` before any checkpoint."""
    @durable_execution
    def empty(event, ctx):
        r = ctx.map([], map_item)
        return [r.status.value, r.completion_reason.value, r.total_count]

    assert json.loads(run_in_runner(empty).result) == ["SUCCEEDED", "ALL_COMPLETED", 0]

    @durable_execution
    def too_many(event, ctx):
        try:
            ctx.map([1, 2], map_item, config=MapConfig(completion_config=CompletionConfig(min_successful=3)))
        except ValidationError:
            return "rejected"

    res = run_in_runner(too_many)
    assert json.loads(res.result) == "rejected"
    assert res.operations == [], "nothing was checkpointed"


@processes
def test_nested_parallel_of_map():
    """§5 verified: ``parallel([branch→ctx.map(["x","y"], …), …])`` → ``[["X","Y"],"plain"]`` with
    ``Parallel > ParallelBranch > Map > MapIteration > Step``."""
    @durable_execution
    def handler(event, ctx):
        def upper(c, item, i, items):
            return c.step(lambda _: item.upper(), name=f"up-{item}")

        def mapper(c):
            return c.map(["x", "y"], upper, name="inner").get_results()

        return ctx.parallel([mapper, lambda c: "plain"], name="outer").get_results()

    res = run_in_runner(handler)
    assert json.loads(res.result) == [["X", "Y"], "plain"]
    chain = []
    op = res.get_context("outer")
    while op is not None:
        chain.append(str(op.sub_type))
        op = op.child_operations[0] if getattr(op, "child_operations", None) else None
    assert chain == ["Parallel", "ParallelBranch", "Map", "MapIteration", "Step"]


@processes
def test_operation_ids_and_parents():
    """§5 verified / §9.9: root op #1 = ``1ced8f5be2db…``, its branch 0 = ``blake2b("1ced…-0")`` =
    ``1712f93e2f51…``, first step in branch 0 = ``48550629202c…``; parent = enclosing context."""
    @durable_execution
    def handler(event, ctx):
        ctx.parallel([lambda c: c.step(lambda _: 1, name="s"), lambda c: 2], name="p")
        ctx.step(lambda _: 3, name="second")

    res = run_in_runner(handler)
    p = res.get_context("p")
    b0 = p.get_context("parallel-branch-0")
    step = b0.get_step("s")
    assert p.operation_id == blake("1") and p.operation_id.startswith("1ced8f5be2db")
    assert b0.operation_id == blake(f"{p.operation_id}-0") and b0.operation_id.startswith("1712f93e2f51")
    assert step.operation_id == blake(f"{b0.operation_id}-1") and step.operation_id.startswith("48550629202c")
    assert p.get_context("parallel-branch-1").operation_id == blake(f"{p.operation_id}-1")
    assert res.get_step("second").operation_id == blake("2")
    assert (p.parent_id, b0.parent_id, step.parent_id) == (None, p.operation_id, b0.operation_id)


@pytest.mark.process_free
@processes
def test_virtual_child_context_ops_have_the_enclosing_parent():
    """§5: ``parent_id`` of an op is the enclosing *non-virtual* context; a virtual child context
    (``ChildConfig(is_virtual=True)``) records nothing, its ops' ids are still prefixed by it."""
    res = run_in_runner(virtual_child_handler)
    assert json.loads(res.result) == 3
    inner = res.get_step("inner")
    assert inner.operation_id == blake(f"{blake('1')}-1")
    assert inner.parent_id is None


@pytest.mark.process_free
@processes
def test_is_replaying_across_a_resumed_run(store_path, invocation_ends_at_first_wait):
    """§5 observed: ``step a; wait 5s; step b`` → ``is_replaying()`` ``[False, True]`` across two
    invocations, each step body run exactly once."""
    seen, ran = [], []

    @durable_execution
    def handler(event, ctx):
        seen.append(ctx.is_replaying())
        ctx.step(lambda _: ran.append("a"), name="a")
        ctx.wait(Duration.from_seconds(5), name="w")
        ctx.step(lambda _: ran.append("b"), name="b")
        return "done"

    with pytest.raises(KeyboardInterrupt):
        handler.run({}, store=store_path, execution_id="replay", skip_time=True)
    assert handler.run({}, store=store_path, execution_id="replay", skip_time=True) == "done"
    assert seen == [False, True]
    assert ran == ["a", "b"]


@pytest.mark.process_free
@processes
def test_non_deterministic_execution_error(store_path, invocation_ends_at_first_wait):
    """§5 observed: ``Non-deterministic operation identity at id='1ced8f5be2db…': name
    checkpoint='name-1' current='name-2'``; an ``ExecutionError`` with termination reason
    ``NON_DETERMINISTIC_EXECUTION`` and ``step_id``, failing the execution."""
    names = ["name-1"]

    @durable_execution
    def handler(event, ctx):
        ctx.step(lambda _: 1, name=names[0])
        ctx.wait(Duration.from_seconds(5))
        return "done"

    with pytest.raises(KeyboardInterrupt):
        handler.run({}, store=store_path, execution_id="nd", skip_time=True)
    names[0] = "name-2"
    with pytest.raises(ExecutionFailedError) as info:
        handler.run({}, store=store_path, execution_id="nd", skip_time=True)
    first = blake("1")
    assert info.value.error.message == \
        f"Non-deterministic operation identity at id='{first}': name checkpoint='name-1' current='name-2'"
    cause = info.value.__cause__
    assert isinstance(cause, NonDeterministicExecutionError) and isinstance(cause, ExecutionError)
    assert cause.termination_reason is TerminationReason.NON_DETERMINISTIC_EXECUTION
    assert cause.step_id == first


@pytest.mark.process_free
@processes
def test_step_bodies_are_not_compared_on_replay(store_path, invocation_ends_at_first_wait):
    """§5: replay compares type, sub_type, name and parent, not step bodies or arguments."""
    bodies = [lambda _: "original"]

    @durable_execution
    def handler(event, ctx):
        value = ctx.step(bodies[0], name="s")
        ctx.wait(Duration.from_seconds(5))
        return value

    with pytest.raises(KeyboardInterrupt):
        handler.run({}, store=store_path, execution_id="bodies", skip_time=True)
    bodies[0] = lambda _: "changed"
    assert handler.run({}, store=store_path, execution_id="bodies", skip_time=True) == "original"


@processes
def test_completed_map_replays_without_rerunning_and_item_namer_runs_eagerly(
        store_path, tmp_path, invocation_ends_at_first_wait):
    """§5: a completed map replays without re-running its items; §3: ``item_namer`` is called for
    every input on every (re)play, even for items early completion never started."""
    marks = tmp_path / "ran"
    named = []

    def item(ctx, x, i, inputs):
        with open(marks, "a") as f:
            f.write(f"{x}\n")
        if x == 1:
            raise RuntimeError("stop")
        return x

    def namer(x, i):
        named.append(i)
        return f"item-{x}"

    @durable_execution
    def handler(event, ctx):
        r = ctx.map([0, 1, 2, 3], item, config=MapConfig(max_concurrency=1, item_namer=namer))
        ctx.wait(Duration.from_seconds(5))
        return [[it.index, it.status.value] for it in r.all]

    with pytest.raises(KeyboardInterrupt):
        handler.run({}, store=store_path, execution_id="map-replay", skip_time=True)
    assert handler.run({}, store=store_path, execution_id="map-replay", skip_time=True) == [
        [0, "SUCCEEDED"], [1, "FAILED"]]
    assert marks.read_text().split() == ["0", "1"], "items ran once, on the first run only"
    assert named == [0, 1, 2, 3, 0, 1, 2, 3]
    with Store(store_path) as st:
        assert sorted(r.name for r in st.ops("map-replay") if r.sub_type == "MapIteration") == ["item-0", "item-1"]


# -- §6 exceptions ---------------------------------------------------------------------------------
@pytest.mark.process_free
def test_exception_hierarchy():
    """§6: the tree of the names durable_mp has (missing names: ``test_import_surface_gaps``)."""
    for cls in (ValidationError, InvalidStateError, SerDesError, DurableOperationError, UnrecoverableError):
        assert issubclass(cls, DurableExecutionsError)
    for cls in (StepError, InvokeError, ChildContextError, WaitForConditionError, CallbackError, BatchCompletionError):
        assert issubclass(cls, DurableOperationError)
    for cls in (CallbackExternalError, CallbackTimeoutError, CallbackSubmitterError):
        assert issubclass(cls, CallbackError)
    assert issubclass(NonDeterministicExecutionError, ExecutionError) and issubclass(ExecutionError, UnrecoverableError)
    assert issubclass(InvocationError, UnrecoverableError)
    for cls in (StepInterruptedError, RetryableSerDesError):
        assert issubclass(cls, InvocationError)
    assert InvocationError("x").is_retryable() is True
    assert issubclass(OrphanedChildException, BaseException) and not issubclass(OrphanedChildException, Exception)
    assert BatchCompletionError().completion_reason is CompletionReason.CUSTOM_COMPLETION_FAILED
    assert [r.value for r in TerminationReason] == [
        "UNHANDLED_ERROR", "INVOCATION_ERROR", "EXECUTION_ERROR", "CHECKPOINT_FAILED",
        "NON_DETERMINISTIC_EXECUTION", "STEP_INTERRUPTED", "SERIALIZATION_ERROR"]


class AppError(Exception):
    pass


@pytest.mark.process_free
def test_error_object_from_exception():
    """§4 / §6: ``type`` is the class name for builtins, ``module.QualName`` otherwise; ``message`` is
    ``str(e)``; wire keys ``ErrorMessage/ErrorType/ErrorData/StackTrace`` with None omitted.
    Deliberate difference (docs/compatibility.md): ``stack_trace`` is kept for ordinary exceptions."""
    builtin = ErrorObject.from_exception(KeyError("k"))
    assert (builtin.type, builtin.message, builtin.data) == ("KeyError", "'k'", None)
    assert ErrorObject.from_exception(AppError("x")).type == f"{__name__}.AppError"
    assert ErrorObject("m", "T", None, None).to_dict() == {"ErrorMessage": "m", "ErrorType": "T"}
    assert ErrorObject.from_dict({"ErrorMessage": "m", "ErrorType": "T", "ErrorData": "d", "StackTrace": ["l"]}) == \
        ErrorObject("m", "T", "d", ["l"])
    assert isinstance(ErrorObject.from_exception(ValueError("v")).stack_trace, list)


@processes
def test_throw_if_error_raises_child_context_error_from_a_rebuilt_cause():
    """§8 observed: ``throw_if_error()`` on the failed result raised ``ChildContextError(message="boom in
    branch body", error_type="ValueError")`` with ``__cause__`` of type ``DurableOperationError``."""
    def boom(ctx):
        raise ValueError("boom in branch body")

    @durable_execution
    def handler(event, ctx):
        r = ctx.parallel([lambda c: 1, boom], config=ParallelConfig(completion_config=CompletionConfig.all_completed()))
        try:
            r.throw_if_error()
        except ChildContextError as exc:
            return [exc.message, exc.error_type, type(exc.__cause__).__name__]

    assert json.loads(run_in_runner(handler).result) == ["boom in branch body", "ValueError", "DurableOperationError"]


# -- §7 operation / history model ------------------------------------------------------------------
@pytest.mark.process_free
def test_operation_enums():
    """§7: enum values of the operation model."""
    assert [t.value for t in OperationType] == ["EXECUTION", "CONTEXT", "STEP", "WAIT", "CALLBACK", "CHAINED_INVOKE"]
    assert [s.value for s in OperationStatus] == ["STARTED", "PENDING", "READY", "SUCCEEDED", "FAILED",
                                                  "CANCELLED", "TIMED_OUT", "STOPPED"]
    assert [a.value for a in OperationAction] == ["START", "SUCCEED", "FAIL", "RETRY", "CANCEL"]
    assert {s.value for s in OperationSubType} == {
        "Step", "Wait", "Callback", "RunInChildContext", "Map", "MapIteration", "Parallel", "ParallelBranch",
        "WaitForCallback", "WaitForCondition", "ChainedInvoke"}


def with_step(ctx):
    return ctx.step(lambda sc: "done", name="s")


def const(ctx):
    return 42


REFERENCE_HISTORY = [  # §7, event_id order, its two InvocationCompleted events as one (one run, no suspension)
    ("ExecutionStarted", None, None), ("ContextStarted", "Parallel", "p"),
    ("ContextStarted", "ParallelBranch", "parallel-branch-0"), ("StepStarted", "Step", "s"),
    ("StepSucceeded", "Step", "s"), ("ContextStarted", "ParallelBranch", "parallel-branch-1"),
    ("ContextSucceeded", "ParallelBranch", "parallel-branch-1"),
    ("ContextSucceeded", "ParallelBranch", "parallel-branch-0"), ("ContextSucceeded", "Parallel", "p"),
    ("WaitStarted", "Wait", "w"), ("WaitSucceeded", "Wait", "w"), ("InvocationCompleted", None, None),
    ("ExecutionSucceeded", None, None)]


@processes
def test_history_of_parallel_then_wait():
    """§7 observed history of ``parallel([step, const]); wait(2s)``: the same events, numbered from 1,
    in the same order up to the interleaving of the two branches, which really run at the same
    time (each branch's and the step's events nest in their parents').  Documented difference
    (``durable_mp.inspect.history``; README: no suspension): one ``InvocationCompleted`` per driver run,
    where the reference has one per suspension."""
    @durable_execution
    def handler(event, ctx):
        r = ctx.parallel([with_step, const], name="p")
        ctx.wait(Duration.from_seconds(2), name="w")
        return r.get_results()

    with DurableFunctionTestRunner(handler) as runner:
        arn = runner.run_async()
        assert json.loads(runner.wait_for_result(arn).result) == ["done", 42]
        events = runner.get_execution_history(arn).events
    got = [(e.event_type, e.sub_type, e.name if e.sub_type else None) for e in events]
    assert [e.event_id for e in events] == list(range(1, 14))
    assert sorted(got, key=str) == sorted(REFERENCE_HISTORY, key=str)
    assert got[:2] == REFERENCE_HISTORY[:2] and got[-4:] == REFERENCE_HISTORY[-4:]
    at = {event: n for n, event in enumerate(got)}
    for name in ("parallel-branch-0", "parallel-branch-1"):
        assert at[("ContextStarted", "ParallelBranch", name)] < at[("ContextSucceeded", "ParallelBranch", name)]
    assert at[("ContextStarted", "ParallelBranch", "parallel-branch-0")] < at[("StepStarted", "Step", "s")] \
        < at[("StepSucceeded", "Step", "s")] < at[("ContextSucceeded", "ParallelBranch", "parallel-branch-0")]


RETRY_TWICE = StepConfig(retry_strategy=create_retry_strategy(RetryStrategyConfig(
    max_attempts=3, initial_delay=Duration(2), jitter_strategy=JitterStrategy.NONE)))


def flaky(step_ctx):
    if step_ctx.attempt < 3:
        raise ConnectionError(f"attempt {step_ctx.attempt}")
    return step_ctx.attempt


@durable_execution
def flaky_handler(event, ctx):
    return ctx.step(flaky, name="flaky", config=RETRY_TWICE)


def step_events():
    with DurableFunctionTestRunner(flaky_handler) as runner:
        arn = runner.run_async()
        assert json.loads(runner.wait_for_result(arn).result) == 3
        return [e for e in runner.get_execution_history(arn).events if e.event_type.startswith("Step")]


@pytest.mark.process_free
@processes
def test_step_retry_history():
    """§7 verified: a retry is a ``StepFailed`` with ``RetryDetails(current_attempt, ...)`` followed by
    a new ``StepStarted``."""
    events = step_events()
    assert [e.event_type for e in events] == ["StepStarted", "StepFailed", "StepStarted", "StepFailed",
                                              "StepStarted", "StepSucceeded"]
    assert [e.details["RetryDetails"]["CurrentAttempt"] for e in events if e.event_type == "StepFailed"] == [1, 2]
    assert events[1].details["Error"]["Payload"]["ErrorType"] == "ConnectionError"


@pytest.mark.process_free
@processes
def test_step_retry_history_carries_the_scheduled_delay():
    """§7: ``RetryDetails.next_attempt_delay_seconds`` is the strategy's delay (2 s, then 2 s x 2.0
    backoff = 4 s), also when the test runner skips time."""
    events = step_events()
    assert [e.details["RetryDetails"].get("NextAttemptDelaySeconds") for e in events
            if e.event_type == "StepFailed"] == [2, 4]


# -- §8 testing SDK: the recorded example program ------------------------------------------------
@durable_step
def timed_work(step_ctx: StepContext, i: int) -> dict:
    time.sleep(0.2)
    return {"branch": i, "attempt": step_ctx.attempt}


def example_branch(i: int, branch_1_fails: bool, step_config=None):
    def run(ctx: DurableContext) -> dict:
        if i == 1 and branch_1_fails:
            raise ValueError("branch 1 exploded")
        return ctx.step(timed_work(i), name=f"work-{i}", config=step_config)
    return run


def summarize(r) -> dict:
    return {"status": r.status.value, "completion_reason": r.completion_reason.value,
            "counts": {"success": r.success_count, "failure": r.failure_count,
                       "started": r.started_count, "total": r.total_count},
            "all": [it.to_dict() for it in r.all], "get_results": r.get_results(),
            "get_errors": [e.to_dict() for e in r.get_errors()]}


@durable_execution
def example_handler(event: dict, ctx: DurableContext) -> dict:
    cfg = ParallelConfig(completion_config=CompletionConfig.all_completed())
    r = ctx.parallel([example_branch(i, event["branch_1_fails"]) for i in range(3)], name="fanout", config=cfg)
    return summarize(r)


def ok_item(i):
    return {"index": i, "status": "SUCCEEDED", "result": {"branch": i, "attempt": 1}, "error": None}


RECORDED = {
    False: {"status": "SUCCEEDED", "completion_reason": "ALL_COMPLETED",
            "counts": {"success": 3, "failure": 0, "started": 0, "total": 3},
            "all": [ok_item(0), ok_item(1), ok_item(2)],
            "get_results": [{"branch": 0, "attempt": 1}, {"branch": 1, "attempt": 1}, {"branch": 2, "attempt": 1}],
            "get_errors": []},
    True: {"status": "FAILED", "completion_reason": "ALL_COMPLETED",
           "counts": {"success": 2, "failure": 1, "started": 0, "total": 3},
           "all": [ok_item(0), {"index": 1, "status": "FAILED", "result": None,
                                "error": {"ErrorMessage": "branch 1 exploded", "ErrorType": "ValueError"}}, ok_item(2)],
           "get_results": [{"branch": 0, "attempt": 1}, {"branch": 2, "attempt": 1}],
           "get_errors": [{"ErrorMessage": "branch 1 exploded", "ErrorType": "ValueError"}]},
}


def _without_stack_traces(out: dict) -> dict:
    for err in [it["error"] for it in out["all"] if it["error"]] + out["get_errors"]:
        assert err.pop("StackTrace"), "durable_mp keeps the traceback (README)"
    return out


@processes
@pytest.mark.parametrize("branch_1_fails", [False, True])
def test_recorded_example_program(branch_1_fails):
    """§8: the example program, both ways: status, completion_reason, counts, items, results and
    errors equal the recorded output; the operation listing matches.  The branch-1 flag comes
    from the event instead of a global (branches are processes, README).  Deliberate differences
    (README): payloads are pickle bytes, ErrorObjects keep ``StackTrace``, the Parallel op
    carries no serialized BatchResult."""
    res = run_in_runner(example_handler, json.dumps({"branch_1_fails": branch_1_fails}))
    assert res.status is InvocationStatus.SUCCEEDED
    assert _without_stack_traces(json.loads(res.result)) == RECORDED[branch_1_fails]
    expected = [("CONTEXT", "Parallel", "fanout", "SUCCEEDED")]
    for i in (2, 1, 0):
        if i == 1 and branch_1_fails:
            expected.append(("CONTEXT", "ParallelBranch", "parallel-branch-1", "FAILED"))
            continue
        expected += [("CONTEXT", "ParallelBranch", f"parallel-branch-{i}", "SUCCEEDED"),
                     ("STEP", "Step", f"work-{i}", "SUCCEEDED")]
    assert names_of(res) == expected
    for op in res.get_all_operations()[1:]:
        if op.status is OperationStatus.SUCCEEDED:
            assert ExtendedTypeSerDes().deserialize(op.result) == {"branch": int(op.name[-1]), "attempt": 1}
        else:
            assert (op.error.message, op.error.type) == ("branch 1 exploded", "ValueError")


@processes
def test_recorded_example_payloads_with_the_reference_serdes():
    """§8 listing: with the reference's ``ExtendedTypeSerDes`` chosen per operation, branch and step
    payloads are the recorded ``{"t":"m",...}`` strings."""
    serdes = ExtendedTypeSerDes()

    @durable_execution
    def handler(event, ctx):
        cfg = ParallelConfig(completion_config=CompletionConfig.all_completed(), item_serdes=serdes)
        branches = [example_branch(i, False, StepConfig(serdes=serdes)) for i in range(3)]
        return ctx.parallel(branches, name="fanout", config=cfg).get_results()

    res = run_in_runner(handler, "{}")
    for op in res.get_all_operations()[1:]:
        i = op.name[-1]
        assert op.result[:60] == f'{{"t":"m","v":{{"branch":{{"t":"i","v":{i}}},"attempt":{{"t":"i","v'[:60]


@pytest.mark.process_free
@processes
def test_callback_flow():
    """§8 verified (``ex_cb.py``): ``run_async`` → ``wait_for_callback(arn, name="approval")`` →
    ``send_callback_success(cid, json.dumps({"approved": True}).encode())`` → ``wait_for_result``;
    ``cb.result()`` returned the str ``'{"approved": true}'``."""
    @durable_execution
    def handler(event, ctx):
        cb = ctx.create_callback(name="approval")
        value = cb.result()
        return [type(value).__name__, value]

    with DurableFunctionTestRunner(handler=handler) as runner:
        arn = runner.run_async(input="{}")
        cid = runner.wait_for_callback(arn, name="approval")
        runner.send_callback_success(cid, json.dumps({"approved": True}).encode())
        res = runner.wait_for_result(arn)
    assert json.loads(res.result) == ["str", '{"approved": true}']


@processes
def test_skip_time_fast_forwards_a_wait_in_a_branch():
    """§8: with ``skip_time=True`` a 3 s wait in a branch does not take 3 s."""
    @durable_execution
    def handler(event, ctx):
        def branch(c):
            c.wait(Duration.from_seconds(3), name="nap")
            return "awake"
        return ctx.parallel([branch]).get_results()

    res = run_in_runner(handler)
    assert json.loads(res.result) == ["awake"]
    nap = next(op for op in res.get_all_operations() if op.name == "nap")
    assert nap.end_timestamp < nap.scheduled_end_timestamp, "woke before the wait's scheduled end"


@pytest.mark.process_free
def test_invocation_status_values():
    """§8: ``InvocationStatus`` is ``SUCCEEDED, FAILED, PENDING, RETRY``."""
    assert [s.value for s in InvocationStatus] == ["SUCCEEDED", "FAILED", "PENDING", "RETRY"]


# -- §9 rough edges where durable_mp documents its own behaviour ----------------------------------
COUNTER = {"n": 0}


def bump(ctx):
    COUNTER["n"] += 1
    return COUNTER["n"]


@processes
def test_globals_mutated_in_branches_stay_in_the_branch():
    """§9.13: the reference shares globals between threads.  Deliberate difference (docs/compatibility.md):
    branches are processes, so the handler does not see a branch's global mutation."""
    @durable_execution
    def handler(event, ctx):
        before = COUNTER["n"]
        r = ctx.parallel([bump, bump], config=ParallelConfig(max_concurrency=2))
        return [r.get_results(), COUNTER["n"] - before]

    results, seen_by_handler = json.loads(run_in_runner(handler).result)
    assert seen_by_handler == 0
    assert all(v >= 1 for v in results)

