"""Resuming an execution whose store already holds failures: a killed driver's re-run, fix-and-resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from durable_mp.store.facade import Store
from procs import session_processes

pytestmark = pytest.mark.timeout(120)

# A map whose item 3 cannot be pickled (it fails before anything runs) and whose item 5 waits
# for a file, so the driver can be killed while the map is half done, item 3's failure committed.
UNPICKLABLE_ITEM_JOB = textwrap.dedent(
    """
    import os, sys, threading, time
    from durable_mp import durable_execution
    from durable_mp.config import CompletionConfig, MapConfig

    RELEASE = sys.argv[2]

    def item(ctx, x, index, items):
        while index == 5 and not os.path.exists(RELEASE):
            time.sleep(0.01)
        return x * 10

    @durable_execution
    def handler(event, ctx):
        items = [0, 1, 2, threading.Lock(), 4, 5, 6]
        result = ctx.map(items, item, name="job", config=MapConfig(
            max_concurrency=1, completion_config=CompletionConfig.all_completed()))
        return [(it.status.value, it.result, it.error and it.error.message) for it in result.all]

    if __name__ == "__main__":
        print(repr(handler.run(None, store=sys.argv[1], execution_id="job")), flush=True)
    """
)


def _item_statuses(store: str) -> dict[str, str]:
    with Store(store) as db:
        return {rec.name: rec.status for rec in db.ops("job") if rec.sub_type == "MapIteration"}


def _wait_for(predicate, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_a_resume_after_a_driver_crash_keeps_an_unpicklable_items_failure(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(UNPICKLABLE_ITEM_JOB)
    store, release = str(tmp_path / "store"), str(tmp_path / "release")
    driver = subprocess.Popen([sys.executable, str(script), store, release], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: os.path.exists(store) and _item_statuses(store).get("map-item-4") == "SUCCEEDED")
        assert _item_statuses(store)["map-item-3"] == "FAILED"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and its workers, mid-map
        driver.communicate(timeout=30)
    _wait_for(lambda: not session_processes(driver.pid))
    with Store(store) as db:
        assert db.get_execution("job").status == "RUNNING"

    open(release, "w").close()
    rerun = subprocess.run([sys.executable, str(script), store, release], capture_output=True, text=True,
                           timeout=90)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    items = eval(rerun.stdout)  # noqa: S307 - the repr of plain tuples printed by the job
    assert [(status, result) for status, result, _ in items] == [
        ("SUCCEEDED", 0), ("SUCCEEDED", 10), ("SUCCEEDED", 20), ("FAILED", None), ("SUCCEEDED", 40),
        ("SUCCEEDED", 50), ("SUCCEEDED", 60)]
    assert "map item 3" in items[3][2] and "lock" in items[3][2]
    with Store(store) as db:
        assert db.get_execution("job").status == "SUCCEEDED"


def test_fix_and_resume_of_an_exhausted_wait_for_condition_starts_a_fresh_attempt_budget(tmp_path):
    """Like a reopened step, a reopened wait_for_condition gets its whole budget again (5 polls here)."""
    from durable_mp import durable_execution
    from durable_mp.config import Duration
    from durable_mp.exceptions import ExecutionFailedError
    from durable_mp.waits import WaitForConditionConfig, WaitStrategyConfig, create_wait_strategy

    fixed = tmp_path / "fixed"
    polls: list[tuple[bool, int]] = []  # (fixed?, state) of every poll

    def check(state, check_ctx):
        polls.append((fixed.exists(), state))
        return state + 1

    def keep_polling(state):  # the broken job never gets there; the fixed one needs 4 polls of this run
        return not fixed.exists() or sum(1 for was_fixed, _ in polls if was_fixed) < 4

    config = WaitForConditionConfig(
        wait_strategy=create_wait_strategy(WaitStrategyConfig(
            should_continue_polling=keep_polling, max_attempts=5, initial_delay=Duration.from_seconds(1))),
        initial_state=0)

    @durable_execution
    def handler(event, ctx):
        return ctx.wait_for_condition(check, config, name="poll")

    store = str(tmp_path / "store")
    with pytest.raises(ExecutionFailedError, match="exhausted 5 attempts"):
        handler.run(None, store=store, execution_id="wfc", skip_time=True)
    assert len(polls) == 5
    fixed.touch()
    handler.run(None, store=store, execution_id="wfc", skip_time=True)
    # 4 polls, from the initial state: a failed operation runs again from its start, as a step does
    assert [state for was_fixed, state in polls if was_fixed] == [0, 1, 2, 3]
    with Store(store) as db:
        rec = next(r for r in db.ops("wfc") if r.sub_type == "WaitForCondition")
    assert rec.status == "SUCCEEDED" and rec.attempt == 9  # numbering continues across the runs


# A job that fails until a file exists; its re-run can be held between taking the execution's
# lock and starting the re-run (``_prepare_rerun``), the window another process's gc/delete hits.
HELD_RERUN_JOB = textwrap.dedent(
    """
    import os, sys, time
    import durable_mp.execution as execution
    from durable_mp import durable_execution

    store, fixed, held, go = sys.argv[1:5]

    @durable_execution
    def handler(event, ctx):
        half = ctx.step(lambda _: 21, name="half")
        if not os.path.exists(fixed):
            raise ValueError("not fixed yet")
        return half * 2

    if held != "-":
        resume = execution.DurableFunction._prepare_rerun

        def held_rerun(self, *args, **kwargs):
            open(held, "w").close()  # the lock is taken, the re-run has not started
            while not os.path.exists(go):
                time.sleep(0.01)
            return resume(self, *args, **kwargs)

        execution.DurableFunction._prepare_rerun = held_rerun
    print(handler.run(None, store=store, execution_id="job"), flush=True)
    """
)


@pytest.mark.parametrize("command", [["delete", "job"], ["gc", "--older-than", "0s"]])
def test_gc_and_delete_leave_a_failed_execution_another_driver_is_resuming(command, tmp_path):
    import durable_mp.cli.main as cli

    script = tmp_path / "job.py"
    script.write_text(HELD_RERUN_JOB)
    store, fixed, held, go = (str(tmp_path / name) for name in ("store", "fixed", "held", "go"))
    first = subprocess.run([sys.executable, str(script), store, fixed, "-", go], capture_output=True, text=True,
                           timeout=90)
    assert first.returncode != 0 and "not fixed yet" in first.stderr
    with Store(store) as db:
        assert db.get_execution("job").status == "FAILED"

    open(fixed, "w").close()
    driver = subprocess.Popen([sys.executable, str(script), store, fixed, held, go], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: os.path.exists(held))
        code = cli.main([*command, "--store", store])
        with Store(store) as db:
            rec = db.get_execution("job")
            assert rec is not None, f"{command[0]} removed an execution a live driver holds"
            assert rec.owner_pid == driver.pid and len(db.ops("job")) == 1
        if command[0] == "delete":
            assert code != 0
    finally:
        open(go, "w").close()
        out, err = driver.communicate(timeout=90)
    assert driver.returncode == 0, err[-3000:]
    assert out.strip() == "42"
    with Store(store) as db:
        assert db.get_execution("job").status == "SUCCEEDED"


@pytest.mark.process_free
@pytest.mark.parametrize("outcomes", [{0: True, 1: False}, {0: True, 1: True, 2: False}, {1: True, 0: False}])
def test_every_replayed_outcome_is_counted(outcomes):
    """A resume counts every item the store holds as ended, also past the decision they reach:
    an uncounted one would be reported STARTED over its stored outcome."""
    from durable_mp.concurrency.models import CompletionPolicy
    from durable_mp.config import CompletionConfig

    policy = CompletionPolicy(CompletionConfig(min_successful=1), 4)
    policy.on_replayed(outcomes)
    assert policy.decision() is not None
    assert (policy.succeeded_count, policy.failed_count) == (sum(outcomes.values()),
                                                            len(outcomes) - sum(outcomes.values()))
