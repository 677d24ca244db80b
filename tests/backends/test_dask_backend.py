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


from durable_mp import BatchItemStatus, durable_execution  # noqa: E402
from durable_mp.config import (  # noqa: E402
    CompletionConfig,
    MapConfig,
)
from durable_mp.backends.dask import CLUSTER_WAIT_KEY  # noqa: E402
from durable_mp.exceptions import ClusterUnavailableError  # noqa: E402
from durable_mp.store.facade import Store  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.shared_cluster]


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
