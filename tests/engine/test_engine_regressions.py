"""Regression tests for the engine defects of "Engine v2" (issue 8): each failed on the old engine.

Real worker processes and a real store; no wall-clock budgets (ordering, counts and
process evidence only).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from durable_mp import durable_execution
from durable_mp.config import CompletionConfig, ParallelConfig

pytestmark = pytest.mark.timeout(120)


# -- 12. a callback wait does not hold the worker's send lock ------------------------------
def test_a_waiting_callback_does_not_stall_sibling_nested_branches(store_path, tmp_path):
    from durable_mp.operation.callback import send_callback_success

    done = tmp_path / "sibling-done"

    def waiter(ctx):
        cb = ctx.create_callback(name="approval")
        (tmp_path / "cbid").write_text(cb.callback_id)
        return cb.result()

    def sibling(ctx):
        while not (tmp_path / "cbid").exists():  # start once the waiter is about to block on its callback
            time.sleep(0.01)
        time.sleep(0.3)
        for k in range(5):
            ctx.step(lambda s, k=k: time.sleep(0.02) or k, name=f"s{k}")  # each record goes out on its own
        done.write_text("")
        return "sibling"

    def item(ctx, x, i, xs):
        r = ctx.parallel([waiter, sibling],
                         config=ParallelConfig(completion_config=CompletionConfig.all_completed()))
        return r.get_results()

    @durable_execution
    def handler(event, ctx):
        return ctx.map([0], item).get_results()

    seen = {}

    def complete_after_sibling():
        deadline = time.monotonic() + 30  # a stalled sibling: the callback is completed anyway, after this
        while time.monotonic() < deadline and not (done.exists() and (tmp_path / "cbid").exists()):
            time.sleep(0.05)
        seen["sibling_finished_while_waiting"] = done.exists()
        send_callback_success((tmp_path / "cbid").read_text(), b'"yes"', store=store_path)

    t = threading.Thread(target=complete_after_sibling, daemon=True)
    t.start()
    result = handler.run(None, store=store_path)
    t.join(5)
    assert seen["sibling_finished_while_waiting"], "the sibling stalled while the callback waited"
    assert result[0][1] == "sibling"


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
