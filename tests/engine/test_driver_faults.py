"""The driver itself dies, is interrupted, or is started twice."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from durable_mp import ExecutionLockedError
from durable_mp.store.facade import Store
from procs import session_processes
from util import marker_counts, wait_until

pytestmark = pytest.mark.timeout(180)

JOB = textwrap.dedent(
    """
    import os, sys, time
    from durable_mp import durable_execution
    from durable_mp.config import ParallelConfig

    MARKERS = os.environ.get("MARKERS", "")
    STEP_SECONDS = float(os.environ.get("STEP_SECONDS", "0.1"))

    def mark(name):
        if MARKERS:
            with open(os.path.join(MARKERS, name), "a") as f:
                f.write("x")

    def branch(i):
        def run(ctx):
            def work(step_ctx):
                mark(f"start-{i}")
                time.sleep(STEP_SECONDS)
                return i
            return ctx.step(work, name=f"work-{i}") * 3
        return run

    @durable_execution
    def handler(event, ctx):
        n = event["n"]
        return ctx.parallel([branch(i) for i in range(n)], name="job",
                            config=ParallelConfig(max_concurrency=2)).get_results()

    if __name__ == "__main__":
        print(handler.run({"n": int(sys.argv[2])}, store=sys.argv[1], execution_id="drv"), flush=True)
    """
)


@pytest.fixture
def job(tmp_path, monkeypatch):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("MARKERS", str(markers))
    return script, markers, str(tmp_path / "store")


def start(script, store, n, **env):
    return subprocess.Popen([sys.executable, str(script), store, str(n)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **env})




def wait_gone(sid: int, seconds: float = 10.0) -> list[int]:
    wait_until(lambda: not session_processes(sid), seconds, interval=0.05)
    return session_processes(sid)


def committed_branches(store) -> set[int]:
    with Store(store) as st:
        return {int(r.name.rsplit("-", 1)[1]) for r in st.ops("drv")
                if r.sub_type == "ParallelBranch" and r.status == "SUCCEEDED"}


def wait_for_starts(markers, n, seconds=60):
    wait_until(lambda: sum(marker_counts(markers, "start").values()) >= n, seconds)


def resume_without_repeating(script, markers, store, done, step_seconds, n=12):
    """Run the interrupted job to completion; branches committed before the stop never run again."""
    proc = start(script, store, n, STEP_SECONDS=step_seconds)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == str([3 * i for i in range(n)])
    starts = marker_counts(markers, "start")
    assert all(starts[i] == 1 for i in done)


def test_workers_exit_when_the_driver_is_sigkilled(job):
    script, markers, store = job
    proc = start(script, store, 20, STEP_SECONDS="5")
    wait_for_starts(markers, 2)
    workers = [p.pid for p in psutil.Process(proc.pid).children()]
    assert workers, "the driver should have worker processes"
    os.kill(proc.pid, signal.SIGKILL)  # only the driver: workers must notice on their own
    proc.wait(timeout=10)
    assert wait_gone(proc.pid) == [], "workers outlived their driver"


def test_driver_kill_loop_then_completion_reruns_nothing_that_finished(job):
    script, markers, store = job
    rng = random.Random(1126)
    n = 48  # 2.4 s of work at max_concurrency=2: three kills of at most 0.5 s land mid-run
    runs_when_committed: dict[int, int] = {}  # branch -> how often it had started when first seen committed
    for _ in range(3):
        before = sum(marker_counts(markers, "start").values())
        proc = start(script, store, n)
        wait_for_starts(markers, before + 1)  # the interpreter may start slowly on a loaded machine
        time.sleep(rng.uniform(0.2, 0.5))  # >= one 0.1 s step plus a group commit after the first start
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_gone(proc.pid) == []
        snapshot = marker_counts(markers, "start")
        for i in committed_branches(store):
            runs_when_committed.setdefault(i, snapshot[i])
    assert 0 < len(runs_when_committed) < n, "kills should land mid-run"
    proc = start(script, store, n)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == str([3 * i for i in range(n)])
    starts = marker_counts(markers, "start")
    assert sorted(starts) == list(range(n))
    for i, runs in runs_when_committed.items():
        assert starts[i] == runs, f"branch {i} was checkpointed before a kill but ran again"
    # each kill may repeat at most the branches in flight (max_concurrency=2) plus one commit window
    assert sum(c - 1 for c in starts.values()) <= 3 * 4


def test_ctrl_c_stops_cleanly_and_a_rerun_resumes(job):
    script, markers, store = job
    proc = start(script, store, 12, STEP_SECONDS="0.3")
    wait_for_starts(markers, 4)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground group
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert wait_gone(proc.pid) == []
    with Store(store) as st:
        rec = st.get_execution("drv")
    assert rec.status == "RUNNING", "an interrupted execution stays resumable, not FAILED"
    assert rec.owner_pid == 0 or not psutil.pid_exists(rec.owner_pid), "the lock is released or its owner dead"
    resume_without_repeating(script, markers, store, committed_branches(store), "0.3")


def _load(script):
    spec = importlib.util.spec_from_file_location("drv_job", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_second_driver_is_refused_and_a_dead_owner_is_taken_over(job, monkeypatch):
    script, markers, store = job
    proc = start(script, store, 6, STEP_SECONDS="3")
    wait_for_starts(markers, 1)
    module = _load(script)
    with pytest.raises(ExecutionLockedError) as info:
        module.handler.run({"n": 6}, store=store, execution_id="drv")
    assert str(proc.pid) in str(info.value)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert wait_gone(proc.pid) == []
    # the module read $STEP_SECONDS when it was loaded; its branches close over the global
    monkeypatch.setattr(module, "STEP_SECONDS", 0.01)
    assert module.handler.run({"n": 6}, store=store, execution_id="drv") == [3 * i for i in range(6)]
    with Store(store) as st:
        rec = st.get_execution("drv")
    assert (rec.status, rec.runs) == ("SUCCEEDED", 2), "the refused driver did not start a run; the takeover did"


STEP_THEN_COMPUTE = textwrap.dedent(
    """
    import os, sys, time
    from durable_mp import durable_execution

    MARKERS = sys.argv[2]

    def branch(ctx):
        def fetch(step_ctx):
            with open(os.path.join(MARKERS, "fetch"), "a") as f:
                f.write("x")
            return 21
        value = ctx.step(fetch, name="fetch")
        if not os.path.exists(os.path.join(MARKERS, "second-run")):
            time.sleep(60)  # a long computation after the step, where the kill lands
        return value * 2

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([branch]).get_results()

    if __name__ == "__main__":
        print(handler.run({}, store=sys.argv[1], execution_id="stream"), flush=True)
    """
)


def test_a_step_is_checkpointed_while_its_branch_keeps_running(tmp_path):
    script = tmp_path / "stream.py"
    script.write_text(STEP_THEN_COMPUTE)
    markers = tmp_path / "m"
    markers.mkdir()
    store = str(tmp_path / "store")
    proc = subprocess.Popen([sys.executable, str(script), store, str(markers)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (markers / "fetch").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # well past the outbox interval and one group commit
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    (markers / "second-run").write_text("")
    out = subprocess.run([sys.executable, str(script), store, str(markers)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[42]"
    assert (markers / "fetch").read_text() == "x", "the finished step ran again after the kill"


def test_sigterm_stops_the_driver_cleanly_and_a_rerun_resumes(job):
    script, markers, store = job
    proc = start(script, store, 12, STEP_SECONDS="0.3")
    wait_for_starts(markers, 4)
    os.kill(proc.pid, signal.SIGTERM)  # the driver only, as `kill PID` or a scheduler would
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert wait_gone(proc.pid) == []
    done = committed_branches(store)
    with Store(store) as st:
        assert st.get_execution("drv").status == "RUNNING"
    resume_without_repeating(script, markers, store, done, "0.01")


AT_MOST_ONCE_JOB = textwrap.dedent(
    """
    import json, os, sys, time
    from durable_mp import StepError, durable_execution
    from durable_mp.config import StepConfig, StepSemantics
    from durable_mp.retries import RetryPresets, RetryStrategyConfig, create_retry_strategy

    STORE, MARKERS, WHERE, RETRY, KILLED = sys.argv[1:6]
    STRATEGY = (create_retry_strategy(RetryStrategyConfig(max_attempts=3)) if RETRY == "retry"
                else RetryPresets.none())
    CONFIG = StepConfig(step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY, retry_strategy=STRATEGY)

    def charge(step_ctx):
        # the STARTED checkpoint is committed before the body runs: the marker says we are past it
        with open(os.path.join(MARKERS, f"attempt-{step_ctx.attempt}"), "w") as f:
            f.write(str(os.getpid()))
        if step_ctx.attempt < int(KILLED):
            raise ValueError(f"attempt {step_ctx.attempt} failed")
        if step_ctx.attempt == int(KILLED):
            time.sleep(60)  # the driver is SIGKILLed here
        return f"charged by attempt {step_ctx.attempt}"

    def run_step(ctx):
        try:
            return ctx.step(charge, name="charge", config=CONFIG)
        except StepError as exc:
            return ["StepError", exc.error_type, str(exc)]

    @durable_execution
    def handler(event, ctx):
        if WHERE == "root":
            return run_step(ctx)
        return ctx.parallel([run_step]).get_results()[0]

    if __name__ == "__main__":
        print(json.dumps(handler.run({}, store=STORE, execution_id="amo", skip_time=True)), flush=True)
    """
)


def _run_at_most_once_job(tmp_path, where: str, retry: str, killed: int = 1):
    """Start the job, SIGKILL its driver while attempt ``killed`` runs, re-run it; (output, markers, store)."""
    script = tmp_path / "amo.py"
    script.write_text(AT_MOST_ONCE_JOB)
    markers = tmp_path / "amo-markers"
    markers.mkdir()
    store = str(tmp_path / "store")
    argv = [sys.executable, str(script), store, str(markers), where, retry, str(killed)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    started = markers / f"attempt-{killed}"
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert started.exists(), proc.communicate(timeout=10)[1]
    os.kill(proc.pid, signal.SIGKILL)  # the driver, while the step body runs
    proc.wait(timeout=10)
    assert wait_gone(proc.pid) == []
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    return json.loads(rerun.stdout), markers, store


@pytest.mark.parametrize("where", ["root", "branch"])
def test_at_most_once_step_interrupted_by_a_driver_kill_goes_to_its_retry_strategy(tmp_path, where):
    out, markers, store = _run_at_most_once_job(tmp_path, where, "retry")
    assert out == "charged by attempt 2"
    assert sorted(os.listdir(markers)) == ["attempt-1", "attempt-2"], "attempt 1 must not run again"
    with Store(store) as st:
        step = next(r for r in st.ops("amo") if r.name == "charge")
    assert (step.status, step.attempt) == ("SUCCEEDED", 2)
    assert [a.number for a in step.attempts] == [1, 2]
    interrupted = step.attempts[0]
    assert interrupted.error["ErrorType"].endswith("StepInterruptedError")
    assert "interrupted during attempt 1" in interrupted.error["ErrorMessage"]
    assert interrupted.retry_delay is not None, "the retry strategy's decision is kept with the attempt"
    assert step.attempts[1].error is None


def test_at_most_once_step_interrupted_by_a_driver_kill_without_retry_fails_naming_the_interruption(tmp_path):
    out, markers, store = _run_at_most_once_job(tmp_path, "root", "none")
    assert out[0] == "StepError"
    assert out[1].endswith("StepInterruptedError")
    assert "'charge' was interrupted during attempt 1" in out[2]
    assert sorted(os.listdir(markers)) == ["attempt-1"]
    with Store(store) as st:
        step = next(r for r in st.ops("amo") if r.name == "charge")
    assert step.status == "FAILED" and step.error["ErrorType"].endswith("StepInterruptedError")
    assert [a.number for a in step.attempts] == [1], "the interrupted attempt is recorded"


def test_a_later_at_most_once_attempt_interrupted_by_a_driver_kill_is_recorded_as_that_attempt(tmp_path):
    out, markers, store = _run_at_most_once_job(tmp_path, "branch", "retry", killed=2)
    assert out == "charged by attempt 3"
    with Store(store) as st:
        step = next(r for r in st.ops("amo") if r.name == "charge")
    assert [a.number for a in step.attempts] == [1, 2, 3]
    failed, interrupted, succeeded = step.attempts
    assert failed.error["ErrorType"] == "ValueError" and failed.retry_delay is not None
    assert interrupted.error["ErrorType"].endswith("StepInterruptedError")
    assert "interrupted during attempt 2" in interrupted.error["ErrorMessage"]
    assert interrupted.retry_delay is not None and succeeded.error is None
