"""Choosing the start method: a ``python -c`` program, the CLI option, an unknown method.

What a user relies on under every start method (results in order, completion policies,
faults, timeouts, memory limits, a SIGKILLed driver) is the behaviour suite in
``tests/behaviour``, run under each start method and on Dask.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import textwrap

import pytest

from durable_mp import ValidationError, durable_execution
from durable_mp.engine.start import START_METHODS, default_start_method

pytestmark = pytest.mark.timeout(180)

METHODS = [m for m in START_METHODS if m in multiprocessing.get_all_start_methods()]
WORKERS = 2  # main's test_a_fresh_worker_imports_no_driver_side_module uses it


@pytest.fixture(params=METHODS)
def method(request):
    return request.param


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


# Loaded only when a branch calls an operation, builds a config or a BatchResult: a trivial
# branch in a fresh worker needs none of them (they were a third of its imports).
OPERATION_MODULES = ("durable_mp.concurrency.models", "durable_mp.concurrency.policy", "durable_mp.config",
                     "durable_mp.operation.batch", "durable_mp.operation.step", "durable_mp.operation.callback",
                     "durable_mp.operation.wait_for_condition", "durable_mp.retries")


@pytest.mark.parametrize("fresh", [m for m in METHODS if m != "fork"])
def test_a_fresh_worker_runs_a_trivial_branch_without_the_operation_modules(fresh, store_path):
    """Issue 23 target 4: what a worker imports before its first branch is on the critical path."""

    def item(ctx, x, index, items):
        import sys

        return sorted(m for m in OPERATION_MODULES if m in sys.modules)

    def step_then_report(ctx):  # an operation in a worker loads its module there, on first use
        import sys

        doubled = ctx.step(lambda _: 21 * 2, name="double")
        return doubled, "durable_mp.operation.step" in sys.modules

    @durable_execution(start_method=fresh, max_workers=1)
    def handler(event, ctx):
        return ctx.map([0, 1], item).get_results(), ctx.parallel([step_then_report]).get_results()

    assert handler.run(None, store=store_path, execution_id="trivial") == ([[], []], [(42, True)])


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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fresh", [m for m in ("forkserver", "spawn") if m in multiprocessing.get_all_start_methods()])
def test_a_timeout_counts_from_the_start_of_the_work_not_the_workers_boot(fresh, store_path):
    """A new interpreter takes a moment to boot; a branch's or a root step's timeout starts when
    the worker begins that work, so an instant body never times out while its worker boots."""
    from durable_mp.config import MapConfig, StepConfig

    @durable_execution(start_method=fresh, max_workers=WORKERS)
    def handler(event, ctx):
        root = ctx.step(lambda _: "root", name="root", config=StepConfig(timeout=0.05))
        mapped = ctx.map([1, 2, 3], lambda c, x, i, xs: x * 2, config=MapConfig(branch_timeout=0.05))
        return root, mapped.get_results(), mapped.failure_count

    assert handler.run(None, store=store_path) == ("root", [2, 4, 6], 0)


@pytest.mark.skipif("spawn" not in METHODS, reason="no spawn start method")
@pytest.mark.timeout(60)
def test_a_root_step_timeout_does_not_count_importing_the_steps_module(store_path, tmp_path, monkeypatch):
    """A step's timeout limits its body.  Unpickling the step's function in a fresh worker
    imports the module it lives in (here one that takes 1.5 s to import outside this process),
    which is the worker getting ready, not the step running (it timed out at 0.5 s)."""
    import importlib
    import os

    from durable_mp.config import StepConfig
    from durable_mp.retries import RetryPresets

    name = f"slow_to_import_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import os, time
        if os.getpid() != {os.getpid()}:
            time.sleep(1.5)
        def body(step_ctx):
            return "ran"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    config = StepConfig(timeout=0.5, retry_strategy=RetryPresets.none())

    @durable_execution(start_method="spawn", max_workers=1)
    def handler(event, ctx):
        return ctx.step(module.body, name="imported", config=config)

    assert handler.run(None, store=store_path) == "ran"


FRESH = [m for m in METHODS if m != "fork"]


def one_item(ctx, x, index, items):
    return x + 1


@pytest.mark.process_free
def test_early_workers_leave_the_driver_a_cpu(monkeypatch):
    from durable_mp.engine import start

    for cpus, wanted, early in ((1, 4, 1), (2, 2, 1), (2, 8, 1), (4, 2, 2), (8, 4, 4), (8, 16, 7)):
        monkeypatch.setattr(start, "usable_cpus", lambda cpus=cpus: cpus)
        assert start.early_workers("spawn", wanted) == early, (cpus, wanted)
        assert start.early_workers("forkserver", wanted) == wanted  # one interpreter boots whatever the count


@pytest.mark.skipif("spawn" not in METHODS, reason="no spawn start method")
def test_on_two_cpus_a_one_item_map_boots_one_interpreter(store_path, monkeypatch):
    """A second interpreter booting beside the first only slowed the first down (issue 23 target 4);
    a batch with work for more workers starts them when it comes."""
    from durable_mp.engine import pool as pool_module
    from durable_mp.engine import start

    monkeypatch.setattr(start, "usable_cpus", lambda: 2)
    started: list[int] = []
    real_spawn = pool_module.spawn_process
    monkeypatch.setattr(pool_module, "spawn_process", lambda *a: (started.append(1), real_spawn(*a))[1])

    @durable_execution(start_method="spawn", max_workers=2)
    def handler(event, ctx):
        first = ctx.map([1], one_item).get_results()
        return first, len(started), ctx.map([1, 2, 3, 4], one_item).get_results(), len(started)

    assert handler.run(None, store=store_path) == ([2], 1, [2, 3, 4, 5], 2)


@pytest.mark.skipif("spawn" not in METHODS, reason="no spawn start method")
def test_no_chunk_is_queued_behind_a_worker_still_booting(store_path, monkeypatch):
    """A chunk prefetched behind a spawned worker that has not booted yet waited for its boot
    while the other worker ran out of work; the queue stays with the driver until it is heard from."""
    from durable_mp.engine import start
    from durable_mp.engine.dispatcher import Dispatcher

    monkeypatch.setattr(start, "usable_cpus", lambda: 2)  # the second worker starts at the batch: it boots
    sends: list[tuple[bool, bool]] = []
    real_send = Dispatcher._send_chunk

    def recording(self, batch, worker, indices, budget, queued=False):
        sends.append((queued, worker.heard))
        return real_send(self, batch, worker, indices, budget, queued)

    monkeypatch.setattr(Dispatcher, "_send_chunk", recording)

    @durable_execution(start_method="spawn", max_workers=2)
    def handler(event, ctx):
        return ctx.map(list(range(3000)), one_item).get_results()

    assert handler.run(None, store=store_path) == list(range(1, 3001))
    assert (True, False) not in sends
    assert (True, True) in sends  # prefetching itself goes on


@pytest.mark.parametrize("fresh", FRESH)
def test_the_first_worker_boots_while_the_store_opens(fresh, store_path, monkeypatch):
    """Opening the store and claiming the execution cost two fsyncs: the interpreter starts before them."""
    from durable_mp.engine.pool import WorkerPool
    from durable_mp.store.facade import Store

    order: list[str] = []
    real_start, real_init = WorkerPool.start, Store.__init__
    monkeypatch.setattr(WorkerPool, "start", lambda self, n: (order.append("workers"), real_start(self, n))[1])
    monkeypatch.setattr(Store, "__init__", lambda self, *a, **k: (order.append("store"), real_init(self, *a, **k))[1])

    @durable_execution(start_method=fresh, max_workers=2)
    def handler(event, ctx):
        return ctx.map([1], one_item).get_results()

    assert handler.run(None, store=store_path) == [2]
    assert order[:2] == ["workers", "store"]


@pytest.mark.parametrize("fresh", FRESH)
def test_a_store_that_does_not_open_leaves_no_worker(fresh, tmp_path):
    from procs import leftover_children

    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")

    @durable_execution(start_method=fresh, max_workers=2)
    def handler(event, ctx):
        return ctx.map([1], one_item).get_results()

    with pytest.raises(Exception):  # noqa: B017 - whatever LMDB or the store says about a file
        handler.run(None, store=str(not_a_directory))
    assert leftover_children(seconds=0.01) == []  # killed and reaped before run raised
