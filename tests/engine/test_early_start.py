"""Workers start with the execution (spawn, forkserver) and never outlive a run that did not use them.

Issue #11 target 3 (time to the first branch): a spawned interpreter or a fork server
boots for hundreds of milliseconds, so their workers are started as soon as the run
holds its execution, and boot while the handler's first steps run; ``fork`` still forks
at the first batch (a forked worker is a copy of the driver as it is then).  Every
test checks, right when ``run`` returns or raises, that no process it started is alive.
"""

from __future__ import annotations

import multiprocessing
import sys

import psutil
import pytest

from durable_mp import ExecutionFailedError, durable_execution
from durable_mp.engine import pool as pool_module
from durable_mp.engine.pool import WorkerPool
from durable_mp.engine.start import START_METHODS, ForkServer
from durable_mp.engine.worker_process import NO_PDEATHSIG_ENV
from durable_mp.rerun import CODE_KEY
from durable_mp.store.facade import RUNNING, Store

METHODS = [m for m in START_METHODS if m in multiprocessing.get_all_start_methods()]
EARLY = [m for m in METHODS if m != "fork"]

# What a driver step sets before the map; a forked worker sees it (read by ``read_setting``).
SETTING = {"value": "as imported"}
INTERRUPT = {"before_map": False}


def live_children() -> list[int]:
    """This process's live descendants (zombies and multiprocessing's resource tracker aside)."""
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and not any("resource_tracker" in p for p in proc.cmdline()):
                out.append(proc.pid)
        except psutil.Error:
            pass
    return out


def count_children(step_ctx) -> int:
    return len(live_children())


def double(ctx, x, index, items):
    return 2 * x


def read_setting(ctx, x, index, items):
    return SETTING["value"]


@durable_execution
def steps_only(event, context):
    """Never uses the pool: returns how many processes were alive when its first step ran."""
    return context.step(count_children, name="children")


@durable_execution
def fails_before_map(event, context):
    context.step(count_children, name="children")
    raise ValueError("the input is bad")


@durable_execution
def maps_after_a_step(event, context):
    if INTERRUPT["before_map"]:
        raise KeyboardInterrupt
    return context.map([1, 2, 3], double, name="double").get_results()


@pytest.mark.parametrize("method", METHODS)
def test_a_handler_that_never_maps_leaves_no_process(method, store_path):
    children_at_first_step = steps_only.run({}, store=store_path, max_workers=2, start_method=method)
    if method == "fork":
        assert children_at_first_step == 0  # forked at the first batch, which never came
    else:
        assert children_at_first_step >= 1  # started with the execution
    assert live_children() == []


@pytest.mark.parametrize("method", METHODS)
def test_a_handler_failing_before_its_first_batch_leaves_no_process(method, store_path):
    with pytest.raises(ExecutionFailedError, match="the input is bad"):
        fails_before_map.run({}, store=store_path, max_workers=2, start_method=method)
    assert live_children() == []


@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_before_the_first_batch_leaves_no_process_and_the_run_resumes(method, store_path, monkeypatch):
    monkeypatch.setitem(INTERRUPT, "before_map", True)
    with pytest.raises(KeyboardInterrupt):
        maps_after_a_step.run({}, store=store_path, execution_id="ctrl-c", max_workers=2, start_method=method)
    assert live_children() == []
    with Store(store_path) as store:
        rec = store.get_execution("ctrl-c")
    assert rec.status == RUNNING and rec.owner_pid == 0  # resumable, and nobody holds it
    monkeypatch.setitem(INTERRUPT, "before_map", False)
    assert maps_after_a_step.run({}, store=store_path, execution_id="ctrl-c", max_workers=2,
                                 start_method=method) == [2, 4, 6]
    assert live_children() == []


@pytest.mark.parametrize("method", EARLY)
def test_ctrl_c_while_the_workers_are_being_started_leaves_no_process(method, store_path, monkeypatch):
    calls = []
    if method == "spawn":
        real = pool_module.spawn_process

        def interrupted(*args, **kwargs):  # the first worker starts, Ctrl-C arrives while the second does
            calls.append(1)
            if len(calls) > 1:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(pool_module, "spawn_process", interrupted)
    else:
        real_request = ForkServer.request

        def interrupted_request(self, conn_fd, slot_fd):
            calls.append(1)
            if len(calls) > 1:
                raise KeyboardInterrupt
            real_request(self, conn_fd, slot_fd)

        monkeypatch.setattr(ForkServer, "request", interrupted_request)
    with pytest.raises(KeyboardInterrupt):
        maps_after_a_step.run({}, store=store_path, execution_id="early-ctrl-c", max_workers=2, start_method=method)
    assert len(calls) == 2
    assert live_children() == []
    with Store(store_path) as store:
        rec = store.get_execution("early-ctrl-c")
    # nobody holds it; no record at all when the Ctrl-C came before the run opened the store
    # (the first workers start before it does)
    assert rec is None or rec.owner_pid == 0


@durable_execution
def sets_then_maps(event, context):
    SETTING["value"] = context.step(lambda _: "set by a driver step", name="set")
    return context.map([0], read_setting, name="read").get_results()


def test_a_forked_worker_is_a_copy_of_the_driver_at_the_first_batch(store_path, monkeypatch):
    monkeypatch.setitem(SETTING, "value", "as imported")
    assert sets_then_maps.run({}, store=store_path, max_workers=2, start_method="fork") == ["set by a driver step"]


@pytest.mark.parametrize("method", EARLY)
def test_early_workers_serve_the_first_batch(method, store_path):
    assert maps_after_a_step.run({}, store=store_path, max_workers=2, start_method=method) == [2, 4, 6]
    assert live_children() == []


def test_a_fork_server_still_booting_is_not_waited_for(monkeypatch):
    """``close`` right after ``start``: the server is killed, not asked to finish its boot first."""
    pool = WorkerPool({"execution_id": "x", "skip_time": False, "watch_steps": False}, "forkserver")
    pool.start(2)
    assert len(pool.requested) == 2 and pool.workers == [] and pool.server is not None
    server = pool.server
    killed = []
    monkeypatch.setattr(ForkServer, "kill", lambda self, real=ForkServer.kill: (killed.append(self.pid), real(self)))
    pool.close()
    assert killed == [server.pid] and server.closed and pool.requested == []
    assert live_children() == []
    pool.close()  # idempotent


def test_ensure_collects_the_workers_start_asked_for():
    pool = WorkerPool({"execution_id": "x", "skip_time": False, "watch_steps": False}, "forkserver")
    try:
        pool.start(2)
        pool.ensure(2)
        assert len(pool.workers) == 2 and pool.requested == [] and pool.server.requested == 0
        assert {w.pid for w in pool.workers} == {c.pid for c in psutil.Process(pool.server.pid).children()}
    finally:
        pool.close()
    assert live_children() == []


@durable_execution
def counts_execution_writes(event, context):
    return context.step(lambda _: len(WRITES), name="writes")


WRITES: list[str] = []


@pytest.mark.process_free
def test_a_new_execution_is_written_once_before_the_handler_runs(store_path, monkeypatch):
    """The lock claim writes the new record durably; a second identical write was one more fsync."""
    real = Store.put_execution
    monkeypatch.setattr(Store, "put_execution", lambda self, rec: (WRITES.append(rec.exec_id), real(self, rec)))
    WRITES.clear()
    assert counts_execution_writes.run({}, store=store_path, execution_id="once") == 0
    with Store(store_path) as store:
        rec = store.get_execution("once")
        assert rec.extra[CODE_KEY]  # the code fingerprint is recorded all the same


def thread_names(ctx, x, index, items):
    import threading

    return sorted(t.name for t in threading.enumerate())


@durable_execution
def worker_threads(event, context):
    return context.map([0], thread_names, name="threads").get_results()[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("pdeathsig", [True, False])
def test_a_worker_watches_its_parent_with_a_thread_only_without_the_kernels_help(pdeathsig, store_path,
                                                                                   monkeypatch):
    """With ``prctl(PR_SET_PDEATHSIG)`` the kernel ends a worker with its driver; a polling thread
    would only add to every worker's start."""
    if not pdeathsig:
        monkeypatch.setenv(NO_PDEATHSIG_ENV, "1")
    names = worker_threads.run({}, store=store_path, max_workers=1, start_method="fork")
    assert ("durable_mp-parent-watch" in names) is not pdeathsig
    assert "durable_mp-reader" in names
