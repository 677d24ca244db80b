"""How many durable writes a run costs, and that ending a run leaves no owner behind.

Every write transaction of the store is an fsync; a short run's fixed cost is mostly
these.  A run takes its execution (one write, the new record with its owner) and ends
with one write that stores the outcome and clears the owner together.
"""

from __future__ import annotations

import pytest

from durable_mp import ExecutionFailedError, durable_execution
from durable_mp.store.facade import Store

pytestmark = pytest.mark.process_free  # no test here starts a process


@durable_execution
def nothing(event, context):
    return event * 2


@durable_execution
def fails(event, context):
    raise ValueError("no")


def _run(handler, store: Store, event, execution_id: str):
    before = store.stats["commits"]
    try:
        return handler.run(event, store=store, execution_id=execution_id), store.stats["commits"] - before
    except ExecutionFailedError:
        return None, store.stats["commits"] - before


@pytest.mark.parametrize("handler, event, status", [(nothing, 21, "SUCCEEDED"), (fails, 1, "FAILED")])
def test_a_run_without_operations_writes_twice_and_ends_unowned(tmp_path, handler, event, status):
    with Store(tmp_path / "s") as store:
        result, commits = _run(handler, store, event, "e1")
        assert commits == 2  # take the execution; store the outcome and release it together
        rec = store.get_execution("e1")
        assert rec.status == status
        assert rec.owner_pid == 0 and rec.owner_create_time == 0.0
        if status == "SUCCEEDED":
            assert result == 42


def test_a_finished_run_can_be_taken_at_once_by_another_thread_of_this_process(tmp_path):
    """The lock is released in full (the process-wide holder too), not only on disk."""
    import threading

    with Store(tmp_path / "s") as store:
        assert _run(nothing, store, 1, "e2")[0] == 2
        got = []
        thread = threading.Thread(target=lambda: got.append(nothing.run(1, store=store, execution_id="e2")))
        thread.start()
        thread.join(60)
        assert got == [2]
