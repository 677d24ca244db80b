"""Cluster faults on a real Dask cluster: ``dask scheduler`` and two ``dask worker`` processes.

What a user relies on on every executor (results, completion, a killed branch, replay,
resume, timeouts, and Dask's documented refusals) is the behaviour suite in
``tests/behaviour``, run on Dask as on each start method.  Here: faults of the cluster
itself, injected by signals to its processes.  One module-wide cluster (nanny
workers, ``allowed-failures`` 1 so a branch that kills its worker is given up on
quickly); the tests that take the scheduler away start their own.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import dask
from dask_cluster import ALLOWED_FAILURES, RealCluster
from procs import leftover_children
from util import marker_count, marker_counts, wait_until


from durable_mp import BatchItemStatus, durable_execution  # noqa: E402
from durable_mp.bench.markers import mark  # noqa: E402
from durable_mp.config import (  # noqa: E402
    CompletionConfig,
    MapConfig,
    ParallelConfig,
    StepConfig,
    StepSemantics,
)
from durable_mp.backends.dask import CLUSTER_WAIT_KEY  # noqa: E402
from durable_mp.exceptions import ClusterUnavailableError  # noqa: E402
from durable_mp.operation.callback import send_callback_success  # noqa: E402
from durable_mp.retries import RetryPresets  # noqa: E402
from durable_mp.store.facade import Store  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.shared_cluster]
AT_MOST_ONCE = StepConfig(step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY)
NO_RETRY = RetryPresets.none()
ALL_COMPLETED = ParallelConfig(completion_config=CompletionConfig.all_completed())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = RealCluster(tmp_path_factory.mktemp("dask"), 2, env=ALLOWED_FAILURES)
    try:
        yield cluster
    finally:
        cluster.close()
        leftovers = leftover_children(10.0)
        assert not leftovers, "the Dask cluster left processes behind"


@pytest.fixture(scope="module")
def client(cluster):
    client = cluster.client(workers=2)
    yield client
    client.close()


@pytest.fixture
def workers_back(client):
    """After a test that kills workers: wait until both are back (their nannies restart them)."""
    yield
    client.wait_for_workers(2, timeout=60)


def test_an_at_most_once_step_in_a_dask_branch_runs_once(client, store_path, tmp_path):
    def charge(step_ctx):
        with open(tmp_path / "charged", "a") as f:
            f.write(f"{os.getpid()}\n")
        return "charged"

    def branch(c):
        return c.step(charge, name="charge", config=AT_MOST_ONCE)

    @durable_execution
    def handler(event, ctx):
        nested = lambda c: c.parallel([branch]).get_results()[0]  # noqa: E731 - a thread inside a Dask task
        top = ctx.parallel([branch, nested], config=ALL_COMPLETED)
        root = ctx.step(charge, name="root-charge", config=AT_MOST_ONCE)
        return top.get_results(), root

    assert handler.run(None, store=store_path, backend=client) == (["charged", "charged"], "charged")
    pids = [int(p) for p in (tmp_path / "charged").read_text().split()]
    assert len(pids) == 3 and pids[-1] == os.getpid() and os.getpid() not in pids[:2], \
        "each body ran once: two on Dask workers, the root one in the driver"
    with Store(store_path) as st:
        charges = [r for r in st.ops(handler.execution_id_for(None)) if r.name == "charge"]
    assert [(r.status, r.attempt) for r in charges] == [("SUCCEEDED", 1)] * 2


def test_an_at_most_once_step_whose_worker_dies_is_not_run_again(client, workers_back, store_path, tmp_path):
    """Its STARTED record is committed before the body runs: Dask's re-run of the task finds it and does not
    run the body again (no retry allowed: the branch fails, as on the local pool); the other branch runs once."""
    ran = tmp_path / "ran"

    def charge(step_ctx):
        with open(ran, "a") as f:
            f.write("charge\n")
        os.kill(os.getpid(), signal.SIGKILL)

    def other(c):
        with open(ran, "a") as f:
            f.write("other\n")
        return "other"

    config = StepConfig(step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY, retry_strategy=NO_RETRY)

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([other, lambda c: c.step(charge, name="charge", config=config)], config=ALL_COMPLETED)

    r = handler.run(None, store=store_path, backend=client)
    assert sorted(ran.read_text().split()) == ["charge", "other"], "the at-most-once body ran once, its worker's death " \
        "did not run it again, nor the branch that had finished"
    assert r.all[0].result == "other"
    assert r.all[1].status == BatchItemStatus.FAILED


def test_a_worker_killed_mid_chunk_costs_only_its_running_item(client, workers_back, store_path, tmp_path):
    """Records stream from the running chunk: Dask's re-run of the task skips its finished items and replays
    the running item's finished steps (both counted by marker lines)."""
    ran = tmp_path / "ran"
    killed = tmp_path / "killed"

    def note(line):
        with open(ran, "a") as f:
            f.write(f"{line}\n")

    def item(c, x, i, xs):
        note(f"item-{i}")
        before = c.step(lambda _: note(f"step-{i}") or i, name="before")
        if i == 2 and not killed.exists():
            time.sleep(0.5)  # its chunk's finished items and this step stream to the driver meanwhile
            killed.write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)
        return before * 2

    @durable_execution
    def handler(event, ctx):
        return ctx.map(list(range(40)), item).get_results()  # first chunks: 4 items each

    assert handler.run(None, store=store_path, backend=client) == [x * 2 for x in range(40)]
    lines = ran.read_text().split()
    assert {line: lines.count(line) for line in lines if lines.count(line) > 1} == {"item-2": 2}, \
        "only the killed item ran again, and its finished step did not"


def test_a_killed_worker_does_not_rerun_finished_items_whose_results_were_big(client, workers_back, store_path,
                                                                              tmp_path):
    """Records over the event limit are handed to the driver as they finish (not held for the chunk's end):
    the worker is SIGKILLed while item 2 runs, after its chunk mates 0 and 1 and item 2's own big step
    finished; none of those runs again (counted by marker files), and the result is exact."""
    markers = str(tmp_path)
    killed = tmp_path / "killed"

    def _big(i: int) -> bytes:  # about 1 MiB, different for each i: far over what a Dask event carries
        return i.to_bytes(4, "little") * (2**18)

    def item(c, x, i, xs):
        mark(markers, f"ran-{i}")
        data = c.step(lambda _: mark(markers, f"step-{i}") or _big(i), name="big") if i == 2 else _big(i)
        if i == 2 and not killed.exists():
            (tmp_path / "pid").write_text(str(os.getpid()))
            deadline = time.monotonic() + 60
            while not killed.exists() and time.monotonic() < deadline:  # killed meanwhile: never returns
                time.sleep(0.02)
        return data

    def kill_when_item_2_runs():
        assert wait_until(lambda: (tmp_path / "pid").exists(), 60)
        pid = int((tmp_path / "pid").read_text())
        os.kill(pid, signal.SIGKILL)
        killed.touch()

    @durable_execution
    def handler(event, ctx):
        return ctx.map(list(range(40)), item).get_results()  # first chunks: 4 items each

    killer = threading.Thread(target=kill_when_item_2_runs, daemon=True)
    killer.start()
    try:
        results = handler.run(None, store=store_path, backend=client)
    finally:
        killed.touch()
        killer.join(60)
    assert [r == _big(i) for i, r in enumerate(results)] == [True] * 40
    runs = marker_counts(markers, "ran")
    assert {i: n for i, n in runs.items() if n != 1} == {2: 2}, "only the killed item ran again"
    assert marker_count(markers, "step-2") == 1, "its big step, finished before the kill, was replayed"


def test_callbacks_in_dask_branches_wait_through_the_driver(client, store_path, tmp_path):
    """The branch's callback record is committed before its id is handed out; the driver answers the wait."""
    ids = tmp_path / "ids"

    def hand_out(callback_id):
        with open(ids, "a") as f:
            f.write(f"{callback_id}\n")

    def answer():
        deadline = time.monotonic() + 60
        answered: set[str] = set()
        while len(answered) < 2 and time.monotonic() < deadline:
            for callback_id in (ids.read_text().split() if ids.exists() else []):
                if callback_id not in answered:
                    send_callback_success(callback_id, f"ok {len(answered)}".encode(), store=store_path)
                    answered.add(callback_id)
            time.sleep(0.05)

    def created(c):
        cb = c.create_callback(name="token")
        c.step(lambda _: hand_out(cb.callback_id), name="submit")
        return cb.result()

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([lambda c: c.wait_for_callback(lambda cid, _: hand_out(cid), name="approval"),
                             created], config=ALL_COMPLETED).get_results()

    sender = threading.Thread(target=answer, daemon=True)
    sender.start()
    assert sorted(handler.run(None, store=store_path, backend=client)) == ["ok 0", "ok 1"]
    sender.join(60)
    with Store(store_path) as st:
        statuses = {r.name: r.status for r in st.ops(handler.execution_id_for(None))}
    assert statuses["approval"] == statuses["token"] == "SUCCEEDED"


# -- defect 9: the start budget applies on Dask as on the local pool ---------------------------------------------
def _ran_log(tmp_path):
    def ran(i):
        with open(tmp_path / "ran", "a") as f:
            f.write(f"{i}\n")
    return ran, lambda: sorted(int(x) for x in (tmp_path / "ran").read_text().split())


# -- cluster faults: exact results, or RUNNING and resumable ----------------------------------------------------
def _slow_item(log_path):
    def item(c, x, i, xs):
        time.sleep(0.05)
        with open(log_path, "a") as f:
            f.write(f"{i}\n")
        return x * 2
    return item


def _runs(log_path) -> list[int]:
    return [int(x) for x in log_path.read_text().split()] if log_path.exists() else []


class _Fault:
    """Runs ``action`` (the fault) once ``count`` items have logged that they ran, in a thread.

    ``cancel`` (in the test's ``finally``, before its cluster closes) stops a fault that has
    not happened and waits for one under way, so no fault outlives its test.
    """

    def __init__(self, log_path, count: int, action) -> None:
        self.cancelled = threading.Event()

        def watch():
            while len(_runs(log_path)) < count:
                if self.cancelled.wait(0.02):
                    return
            action()

        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        self.cancelled.set()
        self.thread.join(60)


def _status(store_path, execution_id):
    with Store(store_path) as st:
        return st.get_execution(execution_id).status


N_FAULT_ITEMS = 60


def test_both_workers_killed_at_once_gives_the_exact_result(cluster, client, workers_back, store_path, tmp_path):
    log_path = tmp_path / "ran"
    pids = cluster.worker_pids(client)

    @durable_execution
    def handler(event, ctx):
        return ctx.map(list(range(N_FAULT_ITEMS)), _slow_item(log_path)).get_results()

    killer = _Fault(log_path, 15, lambda: [os.kill(pid, signal.SIGKILL) for pid in pids])
    try:
        assert handler.run(None, store=store_path, backend=client) == [x * 2 for x in range(N_FAULT_ITEMS)]
    finally:
        killer.cancel()
    assert sorted(set(_runs(log_path))) == list(range(N_FAULT_ITEMS))
    assert set(cluster.worker_pids(client)).isdisjoint(pids), "both workers were really killed (and restarted)"
    assert _status(store_path, handler.execution_id_for(None)) == "SUCCEEDED"


def test_an_item_that_kills_its_worker_every_time_fails_alone(client, workers_back, store_path, tmp_path):
    log_path = tmp_path / "ran"
    slow = _slow_item(log_path)

    def item(c, x, i, xs):
        if i == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return slow(c, x, i, xs)

    @durable_execution
    def handler(event, ctx):
        return ctx.map(list(range(12)), item, config=MapConfig(completion_config=CompletionConfig.all_completed()))

    r = handler.run(None, store=store_path, backend=client, max_crash_retries=2)
    assert r.all[5].status == BatchItemStatus.FAILED
    assert r.all[5].error.type == "durable_mp.exceptions.WorkerCrashedError"
    assert [it.result for it in r.all if it.index != 5] == [x * 2 for x in range(12) if x != 5]
    assert r.failure_count == 1 and r.success_count == 11


def test_a_killed_scheduler_stops_the_run_resumable_never_partial(store_path, tmp_path):
    cluster = RealCluster(tmp_path / "cluster", 2, env=ALLOWED_FAILURES)
    log_path = tmp_path / "ran"
    fault = _Fault(log_path, 15, cluster.kill_scheduler)
    try:
        client = cluster.client(workers=2)

        @durable_execution
        def handler(event, ctx):
            return ctx.map(list(range(N_FAULT_ITEMS)), _slow_item(log_path)).get_results()

        with dask.config.set({CLUSTER_WAIT_KEY: 2}), pytest.raises(ClusterUnavailableError, match="RUNNING"):
            handler.run(None, store=store_path, backend=client)
        assert _status(store_path, handler.execution_id_for(None)) == "RUNNING"
        client.close()
    finally:
        fault.cancel()
        cluster.close()
    # resumed (here on the local pool): exact, and what had finished did not run again
    finished_before = len(_runs(log_path))
    assert handler.run(None, store=store_path) == [x * 2 for x in range(N_FAULT_ITEMS)]
    assert sorted(set(_runs(log_path))) == list(range(N_FAULT_ITEMS))
    assert len(_runs(log_path)) - finished_before < N_FAULT_ITEMS


def test_a_restarted_cluster_costs_only_reruns(store_path, tmp_path):
    cluster = RealCluster(tmp_path / "cluster", 2, env=ALLOWED_FAILURES)
    log_path = tmp_path / "ran"
    restarter = None
    try:
        client = cluster.client(workers=2)

        @durable_execution
        def handler(event, ctx):
            return ctx.map(list(range(N_FAULT_ITEMS)), _slow_item(log_path)).get_results()

        restarter = _Fault(log_path, 15, cluster.restart)
        with dask.config.set({CLUSTER_WAIT_KEY: 60}):
            assert handler.run(None, store=store_path, backend=client) == [x * 2 for x in range(N_FAULT_ITEMS)]
        assert sorted(set(_runs(log_path))) == list(range(N_FAULT_ITEMS))
        client.close()
    finally:
        if restarter is not None:
            restarter.cancel()
        cluster.close()


def test_the_wait_for_a_lost_scheduler_outlasts_the_clients_own_reconnect_timeout(store_path, tmp_path):
    """The client gives up reconnecting after distributed.comm.timeouts.connect; the run waits on, up to its limit."""
    cluster = RealCluster(tmp_path / "cluster", 2, env=ALLOWED_FAILURES)
    log_path = tmp_path / "ran"
    back = None
    try:
        client = cluster.client(workers=2, timeout=2)

        @durable_execution
        def handler(event, ctx):
            return ctx.map(list(range(N_FAULT_ITEMS)), _slow_item(log_path)).get_results()

        def away_for_a_while():
            cluster.kill_scheduler()
            time.sleep(5)  # longer than the client's 2 s
            cluster.restart()

        back = _Fault(log_path, 15, away_for_a_while)
        with dask.config.set({CLUSTER_WAIT_KEY: 60}):
            assert handler.run(None, store=store_path, backend=client) == [x * 2 for x in range(N_FAULT_ITEMS)]
        assert client.status == "closed", "the client itself had given up"
    finally:
        if back is not None:
            back.cancel()
        cluster.close()


def test_a_cluster_without_workers_waits_then_stops_resumable(store_path, tmp_path):
    cluster = RealCluster(tmp_path / "cluster", 0)
    log_path = tmp_path / "ran"
    try:
        client = cluster.client()

        @durable_execution
        def handler(event, ctx):
            return ctx.map(list(range(8)), _slow_item(log_path)).get_results()

        with dask.config.set({CLUSTER_WAIT_KEY: 1.5}), pytest.raises(ClusterUnavailableError, match="no workers"):
            handler.run(None, store=store_path, backend=client)
        assert _status(store_path, handler.execution_id_for(None)) == "RUNNING"
        assert not _runs(log_path)
        cluster.add_worker()  # joins while the next run waits for it
        with dask.config.set({CLUSTER_WAIT_KEY: 60}):
            assert handler.run(None, store=store_path, backend=client) == [x * 2 for x in range(8)]
        client.close()
    finally:
        cluster.close()


# -- what reaches the driver -------------------------------------------------------------------------------------
def test_ctx_logger_lines_of_dask_branches_reach_the_driver(client, store_path, caplog):
    def item(c, x, i, xs):
        c.logger.warning("item %d says %s", i, x)
        return x

    @durable_execution
    def handler(event, ctx):
        return ctx.map(["a", "b", "c"], item).get_results()

    with caplog.at_level(logging.INFO, logger="durable_mp"):
        assert handler.run(None, store=store_path, backend=client) == ["a", "b", "c"]
    lines = {(r.getMessage(), getattr(r, "branchIndex", None)) for r in caplog.records if "says" in r.getMessage()}
    assert lines == {("item 0 says a", 0), ("item 1 says b", 1), ("item 2 says c", 2)}
    execution = handler.execution_id_for(None)
    assert all(r.executionArn == execution for r in caplog.records if "says" in r.getMessage())


def test_fault_of_charges_only_a_branch_that_was_running_when_dask_gave_up():
    from concurrent.futures import CancelledError

    from distributed import KilledWorker
    from distributed.comm.core import CommClosedError

    from durable_mp.backends.dask import DaskFault, fault_of

    killed = KilledWorker("run_chunk-x", "tcp://127.0.0.1:1", 3)
    assert fault_of(killed, 1, runs=4) is DaskFault.KILLED_ALONE
    assert fault_of(killed, 1, runs=0) is DaskFault.KILLED_QUEUED  # it sat queued behind a worker-killer
    assert fault_of(killed, 5, runs=4) is DaskFault.KILLED_CHUNK
    for exc in (CancelledError("scheduler-connection-lost"), CommClosedError("closed"), OSError("reset"),
                TimeoutError("gather")):
        assert fault_of(exc, 3) is DaskFault.INFRASTRUCTURE
    assert fault_of(ModuleNotFoundError("jobs"), 3) is DaskFault.TASK_ERROR
