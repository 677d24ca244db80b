"""Regression tests for the engine defects of "Engine v2" (issue 8): each failed on the old engine.

Real worker processes and a real store; no wall-clock budgets (ordering, counts and
process evidence only).
"""

from __future__ import annotations

import os

import pytest

from durable_mp import durable_execution

pytestmark = pytest.mark.timeout(120)


# -- 12. reaping never blocks the driver ------------------------------------------------------
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


# -- a branch's traceback starts at the user's code ------------------------------------------
def test_a_failed_branch_traceback_starts_in_user_code(store_path):
    def boom(ctx):
        raise RuntimeError("orders service down")

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([boom]).all[0].error.stack_trace

    trace = "".join(handler.run(None, store=store_path))
    assert "engine/branch.py" not in trace, trace
    assert __file__ in trace and "orders service down" in trace
