"""What a user relies on, run under every executor: fork, forkserver, spawn and a Dask cluster.

One suite (CPython's ``test_concurrent_futures`` shape): the ``executor`` fixture
(``conftest.py``) runs each test once per start method and once on a real Dask cluster.
Where durable_mp documents a refusal on Dask (``executors.Refused``), the Dask run asserts
the refusal instead of the behaviour.  What ran is counted with marker files, never timed.
Jobs are small and use two workers: a spawned worker pays a whole interpreter start.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import diffgen

from durable_mp import BatchItemStatus, CompletionReason, ExecutionFailedError, StepContext, durable_execution
from durable_mp.bench.markers import mark
from durable_mp.config import CompletionConfig, Duration, MapConfig, ParallelConfig, StepConfig, StepSemantics
from durable_mp.exceptions import ValidationError
from durable_mp.retries import JitterStrategy, RetryPresets, RetryStrategyConfig, create_retry_strategy
from durable_mp.store.facade import Store
from executors import Refused
from procs import session_processes
from util import REPO, TESTS, comparable_records, marker_count, wait_until

try:  # main moved it to engine/worker_process.py after this branch began: drop the fallback once merged
    from durable_mp.engine.worker_process import NO_PDEATHSIG_ENV
except ImportError:
    from durable_mp.engine.worker import NO_PDEATHSIG_ENV

pytestmark = pytest.mark.timeout(180)

ALL_COMPLETED = ParallelConfig(completion_config=CompletionConfig.all_completed())
NO_RETRY = RetryPresets.none()  # a refusal is an error of the step: its retry strategy would retry it
AT_MOST_ONCE = StepConfig(step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY)
HERE = Path(__file__).resolve().parent

# Changed by a test in the driver after import: a forked worker sees the change, a
# spawned one (fresh interpreter), a fork-server one (forked before) and a Dask worker do not.
SEEN_BY_WORKER = "as imported"


def _counts(markers, prefix: str, n: int) -> list[int]:
    return [marker_count(markers, f"{prefix}-{i}") for i in range(n)]


def _wait_for(path: Path, seconds: float = 30.0) -> None:
    """Inside a branch: block until ``path`` exists (a test's release), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _ops(store_path, handler, event=None):
    with Store(store_path) as st:
        return st.ops(handler.execution_id_for(event))


# -- results -------------------------------------------------------------------------------------------------------
def test_results_in_input_order_from_workers_started_the_asked_way(executor, store_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "SEEN_BY_WORKER", "changed in the driver")
    factor = 7  # a closure: the map function travels by value (cloudpickle)

    def where():
        module = importlib.import_module(__name__)  # importable in the worker: the driver's sys.path
        return os.getpid(), os.getppid(), module.SEEN_BY_WORKER

    def item(ctx, x, index, items):
        return (x * factor, *where())

    @durable_execution
    def handler(event, ctx):
        par = ctx.parallel([lambda c, i=i: c.step(lambda _: (i, *where()), name=f"s{i}") for i in range(4)])
        return par.get_results(), ctx.map(list(range(40)), item).get_results()

    par, mapped = executor.run(handler, store=store_path)
    assert [v[0] for v in par] == [0, 1, 2, 3]
    assert [v[0] for v in mapped] == [7 * x for x in range(40)]
    out = par + mapped
    assert os.getpid() not in {pid for _, pid, _, _ in out}, "every branch ran in a worker"
    parents = {ppid for _, _, ppid, _ in out}
    if executor.name in ("forkserver", "dask"):
        assert os.getpid() not in parents, "fork-server workers are the server's children, Dask's the nanny's"
    else:
        assert parents == {os.getpid()}
    assert {s for _, _, _, s in out} == {"changed in the driver" if executor.name == "fork" else "as imported"}
    ops = _ops(store_path, handler)
    assert sum(1 for r in ops if r.sub_type == "MapIteration") == 40
    assert sum(1 for r in ops if r.sub_type == "Step" and r.status == "SUCCEEDED") == 4


def test_unpicklable_result_fails_only_its_branch(executor, store_path):
    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([lambda c: threading.Lock(), lambda c: "fine"], config=ALL_COMPLETED)

    r = executor.run(handler, store=store_path)
    assert r.all[0].status == BatchItemStatus.FAILED
    assert r.all[0].error.type.endswith("SerDesError")
    assert "Cannot serialize result of" in r.all[0].error.message and "_thread.lock" in r.all[0].error.message
    assert r.all[1].result == "fine"


# -- failures and completion ---------------------------------------------------------------------------------------
def test_a_failing_branch_lets_its_running_sibling_finish(executor, store_path, tmp_path):
    """The blog post's error isolation: 2 successes, 1 failure, FAILED, ALL_COMPLETED."""
    started, failed = tmp_path / "slow-started", tmp_path / "failed"

    def quick(ctx):
        return {"user": 1}

    def slow(ctx):
        started.touch()
        _wait_for(failed)  # still running when its sibling fails
        return {"orders": 2}

    def boom(ctx):
        _wait_for(started)  # fails only once its sibling runs, whichever worker started first
        failed.touch()
        raise RuntimeError("orders service down")

    @durable_execution
    def handler(event, ctx):
        r = ctx.parallel([quick, slow, boom])
        return r.success_count, r.failure_count, r.status.value, r.completion_reason.value, r.get_results()

    assert executor.run(handler, store=store_path) == (2, 1, "FAILED", "ALL_COMPLETED", [{"user": 1}, {"orders": 2}])


def test_failures_inside_branches_and_a_nested_batch(executor, store_path):
    @durable_execution
    def handler(event, ctx):
        def bad(c):
            raise ValueError("branch failed")

        def nested(c):
            inner = c.map(["x", "y"], lambda cc, s, i, xs: cc.step(lambda _: s.upper(), name=f"up-{s}"))
            return inner.get_results()

        r = ctx.parallel([bad, nested, lambda c: "plain"], config=ALL_COMPLETED)
        return r, ctx.parallel([nested, lambda c: "plain"]).get_results()

    r, clean = executor.run(handler, store=store_path)
    assert r.all[0].status == BatchItemStatus.FAILED and r.all[0].error.type == "ValueError"
    assert [r.all[1].result, r.all[2].result] == [["X", "Y"], "plain"]
    assert clean == [["X", "Y"], "plain"]


def test_fail_fast_with_one_at_a_time_starts_nothing_after_the_failure(executor, store_path, tmp_path):
    markers = str(tmp_path)

    def branch(i):
        def run(ctx):
            mark(markers, f"ran-{i}")
            if i < 2:
                raise ValueError(f"branch {i} fails")
            return i
        return run

    def item(c, x, i, xs):
        mark(markers, f"item-{i}")
        if i == 1:
            raise ValueError("item 1 fails")
        return x

    tolerate_one = ParallelConfig(max_concurrency=1, completion_config=CompletionConfig(tolerated_failure_count=1))

    @durable_execution
    def handler(event, ctx):
        r = ctx.parallel([branch(i) for i in range(6)], config=tolerate_one)
        return r.completion_reason, ctx.map(list(range(64)), item, config=MapConfig(max_concurrency=1))

    reason, fail_fast = executor.run(handler, store=store_path)
    assert reason == CompletionReason.FAILURE_TOLERANCE_EXCEEDED
    assert _counts(markers, "ran", 6) == [1, 1, 0, 0, 0, 0]
    assert fail_fast.completion_reason == CompletionReason.FAILURE_TOLERANCE_EXCEEDED
    assert fail_fast.total_count == 2
    assert [it.status for it in fail_fast.all] == [BatchItemStatus.SUCCEEDED, BatchItemStatus.FAILED]
    assert _counts(markers, "item", 64) == [1, 1] + [0] * 62


def test_first_and_min_successful_complete_and_leave_never_started_items_out(executor, store_path, tmp_path):
    markers = str(tmp_path)

    def item(prefix):
        def run(c, x, i, xs):
            mark(markers, f"{prefix}-{i}")
            if prefix == "min" and i == 0:
                raise ValueError("item 0 fails")
            return x
        return run

    def config(completion):
        return MapConfig(max_concurrency=1, completion_config=completion)

    @durable_execution
    def handler(event, ctx):
        first = ctx.map(list(range(64)), item("first"), config=config(CompletionConfig.first_successful()))
        two = ctx.map(list(range(64)), item("min"), config=config(
            CompletionConfig(min_successful=2, tolerated_failure_count=1)))
        return first, two

    first, two = executor.run(handler, store=store_path)
    assert first.completion_reason == CompletionReason.MIN_SUCCESSFUL_REACHED
    assert first.success_count == 1 and first.total_count == 1 and first.get_results() == [0]
    assert _counts(markers, "first", 64) == [1] + [0] * 63
    assert two.completion_reason == CompletionReason.MIN_SUCCESSFUL_REACHED
    assert (two.success_count, two.failure_count, two.total_count) == (2, 1, 3)
    assert [it.index for it in two.all] == [0, 1, 2] and two.get_results() == [1, 2]
    assert _counts(markers, "min", 64) == [1, 1, 1] + [0] * 61


def test_first_successful_terminates_a_running_loser_and_does_not_wait_for_it(executor, store_path, tmp_path):
    started, release, ended = tmp_path / "slow-started", tmp_path / "release", tmp_path / "slow-ended"

    def fast(ctx):
        _wait_for(started)  # wins while the loser runs
        return "fast"

    def slow(ctx):
        started.touch()
        _wait_for(release, 60)
        ended.touch()
        return "slow"

    @durable_execution
    def handler(event, ctx):
        r = ctx.parallel([fast, slow], config=ParallelConfig(completion_config=CompletionConfig.first_successful()))
        return r.completion_reason, [it.status for it in r.all], r.get_results()

    try:
        reason, statuses, results = executor.run(handler, store=store_path)
        assert not ended.exists(), "early completion must not wait for the loser"
    finally:
        release.touch()  # a Dask thread runs on, unobserved (docs/dask.md): let it end
    assert reason is CompletionReason.MIN_SUCCESSFUL_REACHED
    assert statuses == [BatchItemStatus.SUCCEEDED, BatchItemStatus.STARTED], "the loser ran to its end"
    assert results == ["fast"]


# -- faults --------------------------------------------------------------------------------------------------------
def test_a_killed_worker_costs_only_its_branch(executor, store_path, tmp_path):
    """Branch 2 SIGKILLs its worker once; every branch's step body is counted by a marker file
    (AT_MOST_ONCE on the local pool: a sibling's step never runs twice)."""
    markers = str(tmp_path)
    semantics = StepConfig() if executor.refuses(Refused.AT_MOST_ONCE_IN_BRANCH) else AT_MOST_ONCE

    def branch(i):
        def run(ctx):
            first = marker_count(markers, f"ran-{i}") == 0
            mark(markers, f"ran-{i}")
            if i == 2 and first:
                os.kill(os.getpid(), signal.SIGKILL)

            def charge(_):
                mark(markers, f"step-{i}")
                return i * 10
            return ctx.step(charge, name=f"charge-{i}", config=semantics)
        return run

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([branch(i) for i in range(6)]).get_results()

    try:
        assert executor.run(handler, store=store_path) == [i * 10 for i in range(6)]
    finally:
        executor.workers_back()
    assert _counts(markers, "ran", 6) == [2 if i == 2 else 1 for i in range(6)]
    assert _counts(markers, "step", 6) == [1] * 6
    if executor.dask:  # Dask reports a lost worker, not how it died
        return
    rec = next(r for r in _ops(store_path, handler) if r.name == "parallel-branch-2")
    message = rec.attempts[0].error["ErrorMessage"]
    assert "killed by SIGKILL" in message, "the exit status reached the crash report"
    assert "peak RSS" in message and "not known" not in message and "peak RSS 0.0 MiB" not in message


def test_branch_timeout_fails_the_branch_without_waiting_for_it(executor, store_path, tmp_path, request):
    release = tmp_path / "release"

    def item(c, x, i, xs):
        if i == 1:
            _wait_for(release, 20)  # far past its 1 s timeout (its worker is killed, or on Dask restarted)
            (tmp_path / "slow-ended").touch()
        return x

    @durable_execution
    def handler(event, ctx):
        return ctx.map([0, 1, 2], item, config=MapConfig(
            branch_timeout=1, completion_config=CompletionConfig.all_completed()))

    try:
        r = executor.run(handler, store=store_path)
        waited = (tmp_path / "slow-ended").exists()
    finally:
        release.touch()
        executor.workers_back()
    assert r.all[1].status == BatchItemStatus.FAILED
    assert r.all[1].error.type == "durable_mp.exceptions.StepTimeoutError"
    assert "timeout" in r.all[1].error.message
    assert [r.all[0].result, r.all[2].result] == [0, 2]
    assert not waited, "the driver did not wait for the timed-out branch"
    time.sleep(0.2)  # a body left running would end now that it is released
    assert not (tmp_path / "slow-ended").exists(), "the timed-out body was stopped with its worker"


def test_step_timeout_in_a_branch_and_at_the_root(executor, store_path, tmp_path, request):
    release = tmp_path / "release"
    cfg = StepConfig(timeout=0.5, retry_strategy=NO_RETRY)

    def slow(step_ctx):
        mark(str(tmp_path), "slow-ran")
        _wait_for(release, 60)
        mark(str(tmp_path), "slow-ended")
        return 1

    # At the root the step runs in a worker of its own (a local process, or a Dask task) that the timeout
    # kills (on Dask: restarts through its nanny), as does the branch's.
    @durable_execution
    def handler(event, ctx):
        try:
            ctx.step(slow, name="root-slow", config=cfg)
            root = "no timeout"
        except Exception as exc:  # noqa: BLE001
            root = type(exc).__name__ + ": " + str(exc)
        branch = ctx.parallel([lambda c: c.step(slow, name="branch-slow", config=cfg), lambda c: "quick"],
                              config=ALL_COMPLETED)
        return root, branch.all[0].status, branch.all[0].error.message, branch.all[1].result

    try:
        # skip_time must not skip a real timeout (local pool); on Dask without it
        root, status, message, quick = executor.run(handler, store=store_path, skip_time=not executor.dask)
    finally:
        release.touch()
        executor.workers_back()
    assert "timeout" in root and "no timeout" not in root
    assert status == BatchItemStatus.FAILED and "timeout" in message
    assert quick == "quick"
    # once each (NO_RETRY): a timeout counts from the step's start, not from loading its function
    assert marker_count(tmp_path, "slow-ran") == 2, "each timed-out body ran once"
    time.sleep(0.2)  # a body left running would end now that it is released
    assert marker_count(tmp_path, "slow-ended") == 0, "both timed-out bodies were stopped with their workers"


def test_memory_limit_ends_the_worker_over_it(executor, store_path):
    limit = 200 * 2**20

    def hog(ctx):
        block = bytearray(400 * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
        time.sleep(30)
        return len(block)

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([hog, lambda c: "small"], config=ALL_COMPLETED)

    if executor.refuses(Refused.MAX_WORKER_MEMORY):
        with pytest.raises(ValidationError, match="memory-limit"):
            executor.run(handler, store=store_path, max_worker_memory=limit)
        return
    r = executor.run(handler, store=store_path, max_worker_memory=limit)
    assert r.all[0].status == BatchItemStatus.FAILED
    assert r.all[0].error.type.endswith("MemoryLimitExceededError")
    assert "over its limit of 200.0 MiB" in r.all[0].error.message
    assert r.all[1].result == "small"


# -- steps that need the driver ------------------------------------------------------------------------------------
def test_an_at_most_once_step_in_a_branch(executor, store_path, tmp_path):
    def charge(step_ctx):
        with open(tmp_path / f"ran-in-{os.getpid()}", "a") as f:
            f.write("x")
        return "charged"

    def branch(c):
        return c.step(charge, name="charge", config=AT_MOST_ONCE)

    @durable_execution
    def handler(event, ctx):
        nested = lambda c: c.parallel([branch]).all[0]  # noqa: E731 - a thread inside the branch's worker
        other = lambda c: c.step(lambda _: "at least once is fine", name="plain")  # noqa: E731
        top = ctx.parallel([branch, nested, other], config=ALL_COMPLETED)
        root = ctx.step(charge, name="root-charge", config=AT_MOST_ONCE)  # the driver can give at-most-once
        return top, root

    top, root = executor.run(handler, store=store_path)
    assert top.all[2].result == "at least once is fine"
    assert root == "charged"
    ran_in = [n for n in os.listdir(tmp_path) if n.startswith("ran-in-")]
    names = [r.name for r in _ops(store_path, handler)]
    assert names.count("root-charge") == 1
    if not executor.refuses(Refused.AT_MOST_ONCE_IN_BRANCH):
        assert top.all[0].result == "charged" and top.all[1].result.result == "charged"
        assert sum(marker_count(tmp_path, n) for n in ran_in) == 3, "each step body ran once"
        assert names.count("charge") == 2
        return
    for refused in (top.all[0], top.all[1].result):  # a branch's own step, and one in its nested batch
        assert refused.status == BatchItemStatus.FAILED
        assert refused.error.type == "durable_mp.exceptions.ValidationError"
        assert "step 'charge'" in refused.error.message and "AT_MOST_ONCE_PER_RETRY" in refused.error.message
        assert "Dask backend" in refused.error.message and "AT_LEAST_ONCE_PER_RETRY" in refused.error.message
    assert ran_in == [f"ran-in-{os.getpid()}"], "the refused step's body never ran on a Dask worker"
    assert "charge" not in names, "the refused step left no STARTED record behind"


def test_callbacks_in_a_branch(executor, store_path, tmp_path):
    submitted = tmp_path / "submitted"

    def submit(callback_id, cb_ctx):
        submitted.write_text(callback_id)

    if not executor.refuses(Refused.CALLBACK_IN_BRANCH):
        @durable_execution
        def token(event, ctx):
            return ctx.parallel([lambda c: c.create_callback(name="token").callback_id]).get_results()

        [callback_id] = executor.run(token, store=store_path)
        assert isinstance(callback_id, str) and callback_id
        return

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([
            lambda c: c.wait_for_callback(submit, name="approval"),
            lambda c: c.create_callback(name="token").callback_id,
        ], config=ALL_COMPLETED)

    r = executor.run(handler, store=store_path)
    for item, name in zip(r.all, ("approval", "token"), strict=True):
        assert item.status == BatchItemStatus.FAILED
        assert item.error.type == "durable_mp.exceptions.ValidationError"
        assert f"{name!r}" in item.error.message
        assert "Dask backend" in item.error.message and "callback" in item.error.message
        assert "handler body" in item.error.message
    assert not submitted.exists()


# -- retries, replay and resume ------------------------------------------------------------------------------------
def test_a_step_in_a_branch_retries_and_sees_its_attempt(executor, store_path, tmp_path, request):
    attempts = tmp_path / "attempts"

    @durable_execution
    def handler(event, ctx):
        def flaky(step_ctx: StepContext):
            with open(attempts, "a") as f:
                f.write(f"{step_ctx.attempt}\n")
            if step_ctx.attempt < 3:
                raise ConnectionError("try again")
            return step_ctx.attempt

        cfg = StepConfig(retry_strategy=create_retry_strategy(RetryStrategyConfig(
            max_attempts=5, initial_delay=Duration.from_seconds(30), jitter_strategy=JitterStrategy.NONE)))
        return ctx.parallel([lambda c: c.step(flaky, config=cfg)]).get_results()

    assert executor.run(handler, store=store_path, skip_time=True) == [3]
    assert attempts.read_text().split() == ["1", "2", "3"]
    step = next(r for r in _ops(store_path, handler) if r.name == "flaky")
    first, second, third = step.attempts
    assert (first.retry_delay, second.retry_delay) == (30, 60)
    for before, after in ((first, second), (second, third)):  # skip_time: each retry began before its delay ran out
        assert after.start_ts < before.end_ts + before.retry_delay


def test_a_finished_execution_replays_and_nothing_runs_again(executor, store_path, tmp_path):
    markers = str(tmp_path)

    @durable_execution
    def handler(event, ctx):
        mark(markers, "handler")
        par = ctx.parallel([lambda c, i=i: c.step(lambda _: mark(markers, f"step-{i}") or i, name=f"s{i}")
                            for i in range(3)]).get_results()
        return par, ctx.map([1, 2, 3], lambda c, x, i, xs: mark(markers, f"item-{i}") or x + 1).get_results()

    expected = ([0, 1, 2], [2, 3, 4])
    assert executor.run(handler, {"k": 1}, store=store_path) == expected
    assert executor.run(handler, {"k": 1}, store=store_path) == expected
    assert handler.run({"k": 1}, store=store_path) == expected  # the stored result needs no executor
    assert marker_count(markers, "handler") == 1
    assert _counts(markers, "step", 3) == [1, 1, 1] and _counts(markers, "item", 3) == [1, 1, 1]


def test_a_failed_execution_fixed_and_run_again_resumes(executor, store_path, tmp_path):
    markers = str(tmp_path)
    fixed = tmp_path / "fixed"

    def square(c, x, i, xs):
        mark(markers, f"item-{i}")
        if x == 3 and not fixed.exists():
            raise ValueError("3 is unlucky")  # the bug
        return x * x

    @durable_execution
    def handler(event, ctx):
        result = ctx.map(list(range(6)), square, name="squares",
                         config=MapConfig(completion_config=CompletionConfig.all_completed()))
        result.throw_if_error()
        return sum(result.get_results())

    with pytest.raises(ExecutionFailedError, match="3 is unlucky"):
        executor.run(handler, store=store_path)
    fixed.touch()  # the fix
    assert executor.run(handler, store=store_path) == sum(x * x for x in range(6))
    assert _counts(markers, "item", 6) == [2 if i == 3 else 1 for i in range(6)], "only the failed item ran again"


def _descendants_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    return alive


def _committed_steps(store: str) -> set[str]:
    try:
        with Store(store) as st:
            return {r.name for r in st.ops("drv") if r.sub_type == "Step" and r.status == "SUCCEEDED"}
    except Exception:  # noqa: BLE001 - the driver has not created the store yet
        return set()


@pytest.mark.timeout(240)
def test_a_sigkilled_driver_resumes_and_nothing_committed_runs_again(executor, tmp_path):
    """The driver (a ``__main__`` script's closures) is SIGKILLed with steps 0 and 1 committed and
    a later one running.  Local workers exit on their own (without ``PR_SET_PDEATHSIG``: the parent
    watch alone); the re-run runs the interrupted steps again and the committed ones never."""
    markers = tmp_path / "markers"
    markers.mkdir()
    store = str(tmp_path / "store")
    where = f"dask:{executor.cluster.address}" if executor.dask else executor.name
    argv = [sys.executable, str(HERE / "driver_job.py"), store, str(markers), where]
    # the driver imports this tree's durable_mp, as the test runner and the Dask workers do
    env = {**os.environ, NO_PDEATHSIG_ENV: "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=env)
    try:
        blocked = {f"start-{i}" for i in range(2, 6)}  # which of them run is the dispatcher's choice
        assert wait_until(lambda: blocked & set(os.listdir(markers)) or proc.poll() is not None, 120), "no start"
        assert proc.poll() is None, proc.stderr.read().decode()
        assert wait_until(lambda: _committed_steps(store) >= {"work-0", "work-1"}, 30)
        helpers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        os.kill(proc.pid, signal.SIGKILL)  # only the driver: its workers must notice on their own
        proc.wait(timeout=10)
        if not executor.dask:
            assert _descendants_gone(helpers, 15) == [], "a worker (or the fork server) outlived its driver"
    finally:
        for pid in session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.communicate()
        (tmp_path / "release").touch()  # Dask threads of the dead driver's tasks end
    committed = _committed_steps(store)
    interrupted = {f"start-{n.split('-')[1]}" for n in os.listdir(markers)} - {f"start-{s[5:]}" for s in committed}
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=150, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip() == str([3 * i for i in range(6)]), rerun.stderr
    assert set(os.listdir(markers)) == {f"start-{i}" for i in range(6)}
    assert {"work-0", "work-1"} <= committed
    assert all(marker_count(markers, f"start-{s[5:]}") == 1 for s in committed), "a committed step ran again"
    if not executor.dask:  # a Dask task of the dead driver may still have been running its chunk
        assert interrupted and interrupted <= blocked
        assert all(marker_count(markers, name) == 2 for name in interrupted), "the interrupted steps ran again"
    executor.workers_back()


GENERATED_HANDLERS = 10  # the differential test's handlers, run under each executor


def _generated_outcome(handler: Any, store: str, execution_id: str, **options: Any) -> dict:
    """Status, result or error of one run, and the records it stored."""
    try:
        outcome: dict = {"status": "SUCCEEDED", "result": handler.run({}, execution_id=execution_id, store=store,
                                                                      skip_time=True, **options)}
    except ExecutionFailedError as exc:
        outcome = {"status": "FAILED", "error": [exc.error.type, exc.error.message]}
    with Store(store) as st:
        outcome["records"] = comparable_records(st, execution_id)
    return outcome


def test_generated_handlers_end_here_as_on_the_default_pool(executor, tmp_path):
    """The reference differential test's generated handlers (steps, retries, waits, child
    contexts, nested parallel and map, every completion config), racing ones left out: each
    ends under this executor exactly as on the default pool, whose runs
    ``tests/api/test_differential.py`` compares with the reference SDK's."""
    seeds = [seed for seed in range(2000, 2100) if not diffgen.generate(seed).racing][:GENERATED_HANDLERS]
    differing = []
    for seed in seeds:
        source = diffgen.generate(seed).source
        if executor.refuses(Refused.AT_MOST_ONCE_IN_BRANCH):
            source = source.replace(", step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY", "")
        handler = diffgen.build(source, diffgen.DURABLE_MP, f"generated_{seed}")
        here = _generated_outcome(handler, str(tmp_path / "here"), f"gen-{seed}", **executor.options())
        pool = _generated_outcome(handler, str(tmp_path / "pool"), f"gen-{seed}")
        if here != pool:
            keys = [key for key in ("status", "result", "error", "records") if here.get(key) != pool.get(key)]
            differing.append(f"seed {seed}: {keys} differ; here {here.get('result', here.get('error'))!r}, "
                             f"default pool {pool.get('result', pool.get('error'))!r}")
    assert not differing, "\n".join(differing)
