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
