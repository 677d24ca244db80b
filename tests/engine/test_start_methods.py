"""The core behaviours under every start method this machine has (issue 12).

One suite, parametrized over ``fork``, ``forkserver`` and ``spawn`` (those
``multiprocessing.get_all_start_methods()`` lists here): results in order, completion
policies, a SIGKILLed worker costing only its branch, step timeouts, memory limits, and
a SIGKILLed driver whose workers exit on their own and whose re-run resumes.  Jobs are
small and use two workers: a spawned worker pays a whole interpreter start.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from durable_mp import BatchItemStatus, ValidationError, durable_execution
from durable_mp.config import CompletionConfig, ParallelConfig, StepConfig
from durable_mp.engine.start import START_METHODS, default_start_method
from durable_mp.engine.worker_process import NO_PDEATHSIG_ENV
from durable_mp.retries import RetryPresets
from durable_mp.store.facade import Store
from procs import session_processes
from util import marker_count

pytestmark = pytest.mark.timeout(180)

METHODS = [m for m in START_METHODS if m in multiprocessing.get_all_start_methods()]
WORKERS = 2
ALL_COMPLETED = ParallelConfig(completion_config=CompletionConfig.all_completed())

# Changed by a test in the driver after import: a forked worker sees the change, a
# spawned one (fresh interpreter) and a fork-server one (forked before) do not.
SEEN_BY_WORKER = "as imported"


@pytest.fixture(params=METHODS)
def method(request):
    return request.param


def test_results_in_order_and_workers_started_the_asked_way(method, store_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "SEEN_BY_WORKER", "changed in the driver")
    factor = 7  # a closure: the map function travels by value (cloudpickle)

    def item(ctx, x, index, items):
        module = importlib.import_module(__name__)  # importable in the worker: the driver's sys.path
        return x * factor, os.getppid(), module.SEEN_BY_WORKER

    @durable_execution(start_method=method, max_workers=WORKERS)
    def handler(event, ctx):
        return ctx.map(list(range(40)), item).get_results()

    out = handler.run(None, store=store_path)
    assert [value for value, _, _ in out] == [7 * x for x in range(40)]
    parents = {ppid for _, ppid, _ in out}
    seen = {s for _, _, s in out}
    if method == "forkserver":
        assert os.getpid() not in parents, "fork-server workers are children of the server"
    else:
        assert parents == {os.getpid()}
    assert seen == {"changed in the driver" if method == "fork" else "as imported"}


def test_completion_policy_stops_starting_branches(method, store_path, tmp_path):
    markers = str(tmp_path)

    def branch(i):
        def run(ctx):
            with open(os.path.join(markers, f"ran-{i}"), "a") as f:
                f.write("x")
            if i < 2:
                raise ValueError(f"branch {i} fails")
            return i
        return run

    config = ParallelConfig(max_concurrency=1,
                            completion_config=CompletionConfig(tolerated_failure_count=1))

    @durable_execution
    def handler(event, ctx):
        r = ctx.parallel([branch(i) for i in range(6)], config=config)
        return r.completion_reason.value, [item.status.value for item in r.all]

    reason, _statuses = handler.run(None, store=store_path, start_method=method)
    assert reason == "FAILURE_TOLERANCE_EXCEEDED"
    assert [marker_count(markers, f"ran-{i}") for i in range(6)] == [1, 1, 0, 0, 0, 0]


def test_a_killed_worker_costs_only_its_branch_and_its_death_is_described(method, store_path, tmp_path):
    markers = str(tmp_path)

    def branch(i):
        def run(ctx):
            first = not os.path.exists(os.path.join(markers, f"ran-{i}"))
            with open(os.path.join(markers, f"ran-{i}"), "a") as f:
                f.write("x")
            if i == 2 and first:
                os.kill(os.getpid(), signal.SIGKILL)
            return i * 10
        return run

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([branch(i) for i in range(6)]).get_results()

    assert handler.run(None, store=store_path, max_workers=WORKERS, start_method=method) == [
        i * 10 for i in range(6)]
    assert [marker_count(markers, f"ran-{i}") for i in range(6)] == [2 if i == 2 else 1 for i in range(6)]
    with Store(store_path) as st:
        rec = next(r for r in st.ops(handler.execution_id_for(None)) if r.name == "parallel-branch-2")
    message = rec.attempts[0].error["ErrorMessage"]
    assert "killed by SIGKILL" in message, "the exit status reached the crash report"
    assert "peak RSS" in message and "not known" not in message and "peak RSS 0.0 MiB" not in message


def test_step_timeout_in_a_branch_and_at_the_root(method, store_path):
    cfg = StepConfig(timeout=0.5, retry_strategy=RetryPresets.none())

    @durable_execution
    def handler(event, ctx):
        try:
            ctx.step(lambda _: time.sleep(60), name="root-slow", config=cfg)  # runs in a worker too
            root = "no timeout"
        except Exception as exc:  # noqa: BLE001
            root = type(exc).__name__ + ": " + str(exc)
        branch = ctx.parallel([lambda c: c.step(lambda _: time.sleep(60), name="branch-slow", config=cfg),
                               lambda c: "quick"], config=ALL_COMPLETED)
        return root, branch.all[0].status, branch.all[0].error.message, branch.all[1].result

    root, status, message, quick = handler.run(None, store=store_path, skip_time=True, max_workers=WORKERS,
                                               start_method=method)
    assert "timeout" in root
    assert status == BatchItemStatus.FAILED and "timeout" in message
    assert quick == "quick"


def test_memory_limit_ends_the_worker_over_it(method, store_path):
    limit = 200 * 2**20

    def hog(ctx):
        block = bytearray(400 * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
        time.sleep(30)
        return len(block)

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([hog, lambda c: "small"], config=ALL_COMPLETED)

    r = handler.run(None, store=store_path, max_worker_memory=limit, max_workers=WORKERS, start_method=method)
    assert r.all[0].status == BatchItemStatus.FAILED
    assert r.all[0].error.type.endswith("MemoryLimitExceededError")
    assert r.all[1].result == "small"


JOB = textwrap.dedent(
    """
    import os, sys, time
    from durable_mp import durable_execution
    from durable_mp.config import ParallelConfig

    MARKERS = sys.argv[3]

    def branch(i):
        def run(ctx):
            def work(step_ctx):
                with open(os.path.join(MARKERS, f"start-{i}"), "a") as f:
                    f.write("x")
                time.sleep(float(os.environ["STEP_SECONDS"]))
                return i
            return ctx.step(work, name=f"work-{i}") * 3
        return run

    @durable_execution(start_method=sys.argv[4], max_workers=2)
    def handler(event, ctx):
        return ctx.parallel([branch(i) for i in range(event["n"])], name="job",
                            config=ParallelConfig(max_concurrency=2)).get_results()

    print(handler.run({"n": int(sys.argv[2])}, store=sys.argv[1], execution_id="drv"), flush=True)
    """
)




def _descendants_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    return alive


@pytest.mark.timeout(240)
def test_driver_sigkilled_workers_exit_without_prctl_and_a_rerun_resumes(method, tmp_path):
    """The job's handler is a ``__main__`` script's closure; workers rely on the parent watch alone."""
    script = tmp_path / "job.py"
    script.write_text(JOB)
    markers = tmp_path / "markers"
    markers.mkdir()
    store = str(tmp_path / "store")
    argv = [sys.executable, str(script), store, "6", str(markers), method]
    env = {**os.environ, NO_PDEATHSIG_ENV: "1", "STEP_SECONDS": "30"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while len(os.listdir(markers)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(os.listdir(markers)) >= 2, proc.stderr.read().decode() if proc.poll() is not None else "no start"
        helpers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        os.kill(proc.pid, signal.SIGKILL)  # only the driver: its workers must notice on their own
        proc.wait(timeout=10)
        assert _descendants_gone(helpers, 15) == [], "a worker (or the fork server) outlived its driver"
    finally:
        for pid in session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.communicate()
    started = {name for name in os.listdir(markers)}
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=150, env={**env, "STEP_SECONDS": "0"})
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip() == str([3 * i for i in range(6)]), rerun.stderr
    assert {name for name in os.listdir(markers)} == {f"start-{i}" for i in range(6)}
    assert all(marker_count(markers, name) == 2 for name in started), "the interrupted steps ran again"


def test_a_python_c_program_runs_lambdas_under_the_method(method, tmp_path):
    program = textwrap.dedent(f"""
        from durable_mp import durable_execution
        offset = 100
        @durable_execution(start_method={method!r}, max_workers=2)
        def handler(event, ctx):
            return ctx.map([1, 2, 3], lambda c, x, i, xs: x + offset).get_results()
        print(handler.run(None, store={str(tmp_path / 'store')!r}, execution_id="c"))
    """)
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[101, 102, 103]"


@pytest.mark.parametrize("fresh", [m for m in METHODS if m != "fork"])  # a forked worker inherits the driver's
def test_a_fresh_worker_imports_no_driver_side_module(fresh, store_path):
    """Under spawn and forkserver a worker imports what running a branch needs, not the store,
    the dispatcher or the command line (issue 23 target 4: they were most of its start)."""
    driver_only = ("lmdb", "psutil", "durable_mp.store.facade", "durable_mp.engine.dispatcher",
                   "durable_mp.engine.pool", "durable_mp.execution", "durable_mp.cli")

    def item(ctx, x, index, items):
        import sys

        return sorted(m for m in driver_only if m in sys.modules)

    @durable_execution(start_method=fresh, max_workers=WORKERS)
    def handler(event, ctx):
        return ctx.map([0, 1], item).get_results()

    assert handler.run(None, store=store_path, execution_id="lazy") == [[], []]


def test_unknown_start_method_is_refused(store_path):
    @durable_execution
    def handler(event, ctx):
        return 1

    with pytest.raises(ValidationError, match="start_method must be one of fork, forkserver, spawn"):
        handler.run(None, store=store_path, start_method="vfork")
    assert default_start_method() == ("fork" if sys.platform.startswith("linux") else "spawn")


CLI_JOB = textwrap.dedent(
    """
    import os
    from durable_mp import durable_execution

    def branch(ctx):  # pickled by reference: the worker imports this file (the loader's sys.path entry)
        return os.getppid()

    @durable_execution
    def job(event, ctx):
        return ctx.parallel([branch, branch]).get_results()
    """
)


def test_cli_start_method_option(method, tmp_path):
    path = tmp_path / f"cli_job_{method}.py"
    path.write_text(CLI_JOB)
    argv = [sys.executable, "-m", "durable_mp", "run", f"{path}:job", "--start-method", method,
            "--max-workers", "2", "--store", str(tmp_path / "store")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, err
    parents = set(json.loads(out))
    assert (parents == {proc.pid}) == (method != "forkserver"), "fork-server workers are the server's children"
    bad = subprocess.run(argv[:5] + ["--start-method", "vfork"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'vfork'" in bad.stderr
