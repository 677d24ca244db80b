"""The end of a run: workers are asked to quit before the last commits, and all are gone when run() returns."""

from __future__ import annotations

import os

import psutil
import pytest

from durable_mp import durable_execution
from durable_mp.engine.pool import WorkerPool
from durable_mp.store.facade import Store

pytestmark = pytest.mark.timeout(120)


def test_workers_quit_while_the_result_is_committed_and_none_outlives_run(store_path, monkeypatch):
    events: list[str] = []
    real_begin, real_close, real_put = WorkerPool.begin_close, WorkerPool.close, Store.put_execution

    def begin_close(self):
        events.append("quit asked")
        real_begin(self)

    def close(self):
        events.append("pool closed")
        real_close(self)

    def put_execution(self, rec):
        events.append(f"execution {rec.status}")
        real_put(self, rec)

    monkeypatch.setattr(WorkerPool, "begin_close", begin_close)
    monkeypatch.setattr(WorkerPool, "close", close)
    monkeypatch.setattr(Store, "put_execution", put_execution)

    @durable_execution
    def handler(event, ctx):
        return ctx.map([1, 2, 3, 4], lambda c, x, i, xs: (x, os.getpid())).get_results()

    results = handler.run(None, store=store_path, max_workers=2)
    assert [x for x, _ in results] == [1, 2, 3, 4]
    done = events.index("execution SUCCEEDED")
    assert "quit asked" in events[:done] and "pool closed" in events[done:], events
    pids = {pid for _, pid in results}
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


# -- reaping never blocks the driver ------------------------------------------------------
def test_reaping_a_worker_that_does_not_exit_in_time_does_not_block(monkeypatch):
    """A killed worker stuck in the kernel (uninterruptible sleep) is collected later, not waited for."""
    from durable_mp.engine import pool as pool_module

    pool = pool_module.WorkerPool({"execution_id": "reap-test"})
    worker = pool.spawn()
    real_wait4 = os.wait4
    stuck = {"on": True}

    def wait4(pid, options):
        if stuck["on"] and pid == worker.pid:
            assert options & os.WNOHANG, "reap must never wait for the exit without a bound"
            return 0, 0, None  # still there: not exited yet
        return real_wait4(pid, options)

    monkeypatch.setattr(pool_module.os, "wait4", wait4)
    try:
        death = pool.kill(worker)
        assert death.exitcode is None and death.signal is None
        assert worker.pid in pool.unreaped and worker not in pool.workers
    finally:
        stuck["on"] = False
        pool.reap_zombies(wait_seconds=5)
        pool.close()
    assert not pool.unreaped
