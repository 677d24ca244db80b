"""Faults cost only the branch they hit: a matrix of stage x fault, crash recovery counts,
timeouts (memory limits: test_memory_limits.py).  Every crash here is real (SIGKILL, os._exit, a segfault)."""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time

import psutil
import pytest

from durable_mp import BatchItemStatus, StepError, durable_execution
from durable_mp.bench.markers import counts, mark
from durable_mp.config import CompletionConfig, MapConfig, ParallelConfig, StepConfig, StepSemantics
from durable_mp.retries import RetryPresets, RetryStrategyConfig, create_retry_strategy
from durable_mp.store.facade import Store
from util import marker_count

pytestmark = pytest.mark.timeout(90)

DRIVER_PID = os.getpid()
ALL_COMPLETED = ParallelConfig(completion_config=CompletionConfig.all_completed())
NO_RETRY = StepConfig(retry_strategy=RetryPresets.none())


def fault(kind: str) -> None:
    if kind == "exception":
        raise ValueError("injected fault")
    if kind == "sys_exit":
        sys.exit(3)
    if kind == "os_exit":
        os._exit(3)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "segfault":
        # pytest's faulthandler, inherited by the worker, would print a crash dump into the
        # terminal for this intended crash; the worker still dies of SIGSEGV, as asserted.
        faulthandler.disable()
        ctypes.string_at(0)
    raise AssertionError(kind)


def _fault_on_load(kind: str) -> None:
    if os.getpid() != DRIVER_PID:
        fault(kind)


def _fault_on_load_in_driver(kind: str) -> None:
    if os.getpid() == DRIVER_PID:
        fault(kind)
    return None


class FaultWhenPickled:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self):
        if os.getpid() == DRIVER_PID and self.kind != "exception":
            raise AssertionError("driver-side faults other than exceptions would kill the test runner")
        fault(self.kind)


class FaultWhenUnpickledInWorker:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self):
        return (_fault_on_load, (self.kind,))


class FaultWhenUnpickledInDriver:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self):
        return (_fault_on_load_in_driver, (self.kind,))


def make_branch(stage: str, kind: str):
    if stage == "pickle_branch":
        bad = FaultWhenPickled(kind)
        return lambda ctx: bad
    if stage == "unpickle_branch":
        bad = FaultWhenUnpickledInWorker(kind)
        return lambda ctx: ("never", bad)
    if stage == "run":
        return lambda ctx: fault(kind)
    if stage == "pickle_result":
        return lambda ctx: FaultWhenPickled(kind)
    if stage == "unpickle_result":
        return lambda ctx: FaultWhenUnpickledInDriver(kind)
    raise AssertionError(stage)


CRASHES = ("os_exit", "sigkill", "segfault")
# (stage, fault) -> (error type of the failed branch, text its message must contain)
MATRIX = {
    ("pickle_branch", "exception"): ("SerDesError", "branch 1 (parallel-branch-1) cannot be pickled"),
    ("unpickle_branch", "exception"): ("SerDesError", "could not be unpickled in the worker"),
    ("unpickle_branch", "sys_exit"): ("SystemExit", "3"),
    ("run", "exception"): ("ValueError", "injected fault"),
    ("run", "sys_exit"): ("SystemExit", "3"),
    ("pickle_result", "exception"): ("SerDesError", "Cannot serialize result of branch 1"),
    ("pickle_result", "sys_exit"): ("SystemExit", "3"),
    ("unpickle_result", "exception"): ("SerDesError", "Cannot deserialize result of branch 1"),
}
for _stage in ("unpickle_branch", "run", "pickle_result"):
    MATRIX[(_stage, "os_exit")] = ("WorkerCrashedError", "exit code 3")
    MATRIX[(_stage, "sigkill")] = ("WorkerCrashedError", "SIGKILL(-9)")
    MATRIX[(_stage, "segfault")] = ("WorkerCrashedError", "SIGSEGV(-11)")


@pytest.mark.parametrize("stage,kind", sorted(MATRIX))
def test_fault_matrix(stage, kind, store_path):
    @durable_execution
    def handler(event, ctx):
        good = [lambda c, i=i: ("ok", i) for i in range(4)]
        branches = [good[0], make_branch(stage, kind), good[2], good[3]]
        return ctx.parallel(branches, config=ALL_COMPLETED)

    r = handler.run(None, store=store_path, skip_time=True)
    expected_type, expected_text = MATRIX[(stage, kind)]
    item = r.all[1]
    assert item.status == BatchItemStatus.FAILED
    assert item.error.type.rsplit(".", 1)[-1] == expected_type
    assert expected_text in item.error.message
    for i in (0, 2, 3):  # every other branch is intact
        assert r.all[i].status == BatchItemStatus.SUCCEEDED and r.all[i].result == ("ok", i)
    if kind in CRASHES:
        assert "crashed its worker 3 times" in item.error.message


def test_a_killed_worker_costs_only_its_branch(store_path, tmp_path):
    markers = str(tmp_path)

    def branch(i):
        def run(ctx):
            first = not os.path.exists(os.path.join(markers, f"ran-{i}"))
            with open(os.path.join(markers, f"ran-{i}"), "a") as f:
                f.write("x")
            if i == 5 and first:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.02)
            return i * 10
        return run

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([branch(i) for i in range(16)]).get_results()

    assert handler.run(None, store=store_path) == [i * 10 for i in range(16)]
    counts = [marker_count(markers, f"ran-{i}") for i in range(16)]
    assert counts == [2 if i == 5 else 1 for i in range(16)]
    with Store(store_path) as st:
        rec = next(r for r in st.ops(handler.execution_id_for(None)) if r.name == "parallel-branch-5")
    assert rec.status == "SUCCEEDED" and len(rec.attempts) == 1, "the worker's death is kept in the record"
    assert "SIGKILL" in rec.attempts[0].error["ErrorMessage"] and rec.attempts[0].pid != rec.pid


AT_MOST_ONCE = StepConfig(step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY,
                          retry_strategy=create_retry_strategy(RetryStrategyConfig(max_attempts=3)))


def _step_in_each_item(markers: str, kill_at: int, kill=lambda: os.kill(os.getpid(), signal.SIGKILL)):
    """A map item whose AT_MOST_ONCE step body leaves a marker ``a<attempt>-<item>`` each time it runs.

    Item ``kill_at`` kills its worker the first time, before its own step: the items before it in
    the chunk ended, but their results may still sit in the worker's outbox.
    """

    def item(ctx, x, i, xs):
        if x == kill_at and not os.path.exists(os.path.join(markers, "killed")):
            open(os.path.join(markers, "killed"), "w").close()
            kill()

        def body(step_ctx):
            mark(markers, f"a{step_ctx.attempt}-{x}")
            return x + 1

        return ctx.step(body, name=f"body-{x}", config=AT_MOST_ONCE)

    return item


def _assert_each_attempt_ran_once(markers: str, n: int) -> None:
    first = counts(markers, "a1")
    assert sorted(first) == list(range(n)), "every item's step body ran"
    for attempt in (1, 2, 3):
        ran = counts(markers, f"a{attempt}")
        twice = {x: times for x, times in ran.items() if times != 1}
        assert not twice, f"attempt {attempt} of these items' step bodies ran more than once: {twice}"


def test_crash_in_a_map_chunk_redispatches_the_rest_of_the_chunk(store_path, tmp_path):
    markers = str(tmp_path)

    @durable_execution
    def handler(event, ctx):
        return ctx.map(list(range(2000)), _step_in_each_item(markers, 500), config=MapConfig(
            completion_config=CompletionConfig.all_completed())).get_results()

    assert handler.run(None, store=store_path) == [x + 1 for x in range(2000)]
    with Store(store_path) as st:
        iters = [r for r in st.ops(handler.execution_id_for(None)) if r.sub_type == "MapIteration"]
    assert len(iters) == 2000 and all(r.status == "SUCCEEDED" for r in iters)
    _assert_each_attempt_ran_once(markers, 2000)


@pytest.mark.parametrize("kill", ["sigkill", "os_exit"])
def test_a_death_redispatches_an_ended_but_unreported_neighbour_with_its_checkpoints(store_path, tmp_path, kill):
    """Issue 18 defect 1: item 4 ended, its records still in the worker's outbox, when item 5 killed
    the worker.  Item 4 may have started, so it runs again with its checkpoints: its AT_MOST_ONCE
    step body never runs twice in one attempt (found STARTED, it is an interrupted attempt)."""
    markers = str(tmp_path)
    kills = {"sigkill": lambda: os.kill(os.getpid(), signal.SIGKILL), "os_exit": lambda: os._exit(3)}

    @durable_execution
    def handler(event, ctx):
        return ctx.map(list(range(64)), _step_in_each_item(markers, 5, kills[kill]), config=MapConfig(
            max_concurrency=1, completion_config=CompletionConfig.all_completed())).get_results()

    assert handler.run(None, store=store_path) == [x + 1 for x in range(64)]
    _assert_each_attempt_ran_once(markers, 64)


def test_step_timeout_kills_the_attempt_and_the_retry_strategy_decides(store_path, tmp_path):
    markers = str(tmp_path)

    def slow_then_fast(step_ctx):
        with open(os.path.join(markers, "attempts"), "a") as f:
            f.write(str(step_ctx.attempt))
        if step_ctx.attempt == 1:
            time.sleep(60)
            open(os.path.join(markers, "attempt-1-ended"), "w").close()
        return f"attempt {step_ctx.attempt}"

    retry_twice = StepConfig(timeout=0.5, retry_strategy=create_retry_strategy(RetryStrategyConfig(max_attempts=2)))

    @durable_execution
    def handler(event, ctx):
        def branch(c):
            return c.step(slow_then_fast, name="slow", config=retry_twice)

        return ctx.parallel([branch, lambda c: "other"]).get_results()

    assert handler.run(None, store=store_path, skip_time=True) == ["attempt 2", "other"]
    assert open(os.path.join(markers, "attempts")).read() == "12"
    assert not os.path.exists(os.path.join(markers, "attempt-1-ended")), "attempt 1 was killed, not awaited"
    with Store(store_path) as st:
        step = next(r for r in st.ops(handler.execution_id_for(None)) if r.name == "slow")
    assert step.status == "SUCCEEDED" and step.attempt == 2
    assert step.attempts[0].error["ErrorType"].endswith("StepTimeoutError")


def test_step_timeout_without_retry_fails_with_step_timeout_error(store_path):
    @durable_execution
    def handler(event, ctx):
        cfg = StepConfig(timeout=0.3, retry_strategy=RetryPresets.none())
        try:
            ctx.step(lambda _: time.sleep(60), name="root-slow", config=cfg)  # a root step runs in a worker too
        except StepError as exc:
            root = exc.error_type
        branch = ctx.parallel([lambda c: c.step(lambda _: time.sleep(60), name="branch-slow", config=cfg)],
                              config=ALL_COMPLETED)
        return root, branch.all[0].error.type, branch.all[0].error.message

    root, branch_type, message = handler.run(None, store=store_path, skip_time=True)
    assert root.endswith("StepTimeoutError")
    assert branch_type == "durable_mp.exceptions.StepError"
    assert "timeout" in message


def test_branch_timeout_fails_only_that_branch(store_path):
    @durable_execution
    def handler(event, ctx):
        cfg = ParallelConfig(branch_timeout=0.5, completion_config=CompletionConfig.all_completed())
        return ctx.parallel([lambda c: time.sleep(60), lambda c: "quick"], config=cfg)

    r = handler.run(None, store=store_path)
    assert r.all[0].status == BatchItemStatus.FAILED
    assert r.all[0].error.type.endswith("StepTimeoutError")
    assert "exceeded its timeout of 0.5s" in r.all[0].error.message
    assert r.all[1].result == "quick"


def test_unpicklable_map_item_fails_only_that_item(store_path):
    @durable_execution
    def handler(event, ctx):
        items = [1, threading.Lock(), 3]
        return ctx.map(items, lambda c, x, i, xs: ("ok", i), config=MapConfig(
            completion_config=CompletionConfig.all_completed()))

    r = handler.run(None, store=store_path)
    assert [it.status for it in r.all] == [BatchItemStatus.SUCCEEDED, BatchItemStatus.FAILED,
                                           BatchItemStatus.SUCCEEDED]
    assert "map item 1" in r.all[1].error.message and "lock" in r.all[1].error.message


def test_unpicklable_root_step_result_is_a_serdes_error_naming_the_step(store_path):
    from durable_mp import SerDesError

    @durable_execution
    def handler(event, ctx):
        try:
            ctx.step(lambda _: threading.Lock(), name="make-lock")
        except SerDesError as exc:
            return str(exc)

    message = handler.run(None, store=store_path)
    assert "result of step 'make-lock'" in message and "lock" in message


def test_oversized_result_is_refused_with_its_size(store_path, monkeypatch):
    from durable_mp import serdes

    monkeypatch.setattr(serdes, "MAX_PAYLOAD_BYTES", 1 << 20)

    @durable_execution
    def handler(event, ctx):
        r = ctx.parallel([lambda c: b"x" * (2 << 20), lambda c: b"small"], config=ALL_COMPLETED)
        return r.all[0].error.message, r.all[1].result

    message, small = handler.run(None, store=store_path)
    # bytes this large are pickled (past the reference's 256 KiB checkpoint limit, no base64)
    assert "2.0 MiB, over the 1 MiB limit" in message
    assert small == b"small"


def test_at_most_once_step_interrupted_by_a_crash_is_not_rerun_blindly(store_path, tmp_path):
    from durable_mp.config import StepSemantics

    marker = tmp_path / "charged"

    def charge_card(step_ctx):
        with open(marker, "a") as f:
            f.write("x")
        os.kill(os.getpid(), signal.SIGKILL)  # dies after the side effect, before its checkpoint

    cfg = StepConfig(step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY, retry_strategy=RetryPresets.none())

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([lambda c: c.step(charge_card, name="charge", config=cfg)], config=ALL_COMPLETED)

    r = handler.run(None, store=store_path)
    assert marker.read_text() == "x", "an AT_MOST_ONCE step must not run again after an interrupted attempt"
    assert r.all[0].status == BatchItemStatus.FAILED
    assert r.all[0].error.type == "durable_mp.exceptions.StepError"
    assert "step 'charge' was interrupted during attempt 1" in r.all[0].error.message
    with Store(store_path) as st:
        step = next(rec for rec in st.ops(handler.execution_id_for(None)) if rec.name == "charge")
    assert step.status == "FAILED" and step.error["ErrorType"].endswith("StepInterruptedError")
    assert [a.number for a in step.attempts] == [1], "the interrupted attempt is recorded"


def test_at_most_once_step_whose_worker_died_goes_to_its_retry_strategy(store_path, tmp_path):
    from durable_mp.config import StepSemantics

    def charge_card(step_ctx):
        with open(tmp_path / f"attempt-{step_ctx.attempt}", "a") as f:
            f.write("x")
        if step_ctx.attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # dies after the side effect, before its checkpoint
        return f"charged by attempt {step_ctx.attempt}"

    cfg = StepConfig(step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY,
                     retry_strategy=create_retry_strategy(RetryStrategyConfig(max_attempts=2)))

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([lambda c: c.step(charge_card, name="charge", config=cfg)]).get_results()

    assert handler.run(None, store=store_path, skip_time=True) == ["charged by attempt 2"]
    assert sorted(os.listdir(tmp_path / "")) == ["attempt-1", "attempt-2", "store"]
    assert (tmp_path / "attempt-1").read_text() == "x"
    with Store(store_path) as st:
        step = next(rec for rec in st.ops(handler.execution_id_for(None)) if rec.name == "charge")
    assert step.status == "SUCCEEDED" and [a.number for a in step.attempts] == [1, 2]
    assert step.attempts[0].error["ErrorType"].endswith("StepInterruptedError")


# -- step timeouts hold inside nested branches ------------------------------------------
@pytest.mark.timeout(120)
def test_a_step_timeout_inside_a_nested_parallel_is_enforced(store_path):
    def slow(step_ctx):
        time.sleep(30)
        return "finished"

    def inner(ctx):
        return ctx.step(slow, name="slow", config=StepConfig(timeout=1, retry_strategy=RetryPresets.none()))

    def quick(ctx):
        return ctx.step(lambda s: "quick", name="quick")

    def item(ctx, x, i, xs):
        r = ctx.parallel([inner, quick], config=ParallelConfig(completion_config=CompletionConfig.all_completed()))
        return [(it.status.value, it.error.type if it.error else None) for it in r.all]

    @durable_execution
    def handler(event, ctx):
        return ctx.map([0], item).get_results()

    results = handler.run(None, store=store_path)  # an ignored timeout: the step returns "finished" after 30 s
    [(status, error), other] = results[0]
    assert status == "FAILED" and error.endswith("StepError") and other == ("SUCCEEDED", None), results


# -- a worker ended by a signal is a worker death ------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_worker_ended_by_a_signal_is_redispatched(store_path, tmp_path, signum):
    marker = tmp_path / "signalled"

    def branch(ctx):
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signum)
            time.sleep(10)
        return "ok"

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([branch]).get_results()

    old = signal.getsignal(signal.SIGTERM)
    try:
        assert handler.run(None, store=store_path) == ["ok"]
    finally:
        signal.signal(signal.SIGTERM, old)


# -- a death is seen from the process, not from the pipe's EOF --------------------------
@pytest.mark.timeout(120)
def test_a_dead_worker_whose_helper_holds_the_pipe_is_noticed_at_once(store_path, tmp_path):
    marker = tmp_path / "helper"

    def branch_with_fork_helper(ctx):
        if not marker.exists():
            pid = os.fork()
            if pid == 0:  # a library's helper process: holds every fd the worker had
                time.sleep(20)
                os._exit(0)
            marker.write_text(str(pid))
            os.kill(os.getpid(), signal.SIGKILL)
        return "ok"

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([branch_with_fork_helper]).get_results()

    try:
        assert handler.run(None, store=store_path) == ["ok"]
        helper = psutil.Process(int(marker.read_text()))
        assert helper.status() != psutil.STATUS_ZOMBIE, "the death was noticed only when the helper exited"
    finally:
        if marker.exists():
            try:
                os.kill(int(marker.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
