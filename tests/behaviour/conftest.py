"""The ``executor`` fixture: every test of ``tests/behaviour`` runs under each start method and on Dask.

As CPython's ``test_concurrent_futures`` runs one suite under fork, forkserver and spawn,
the module-scoped, parametrized ``executor`` runs each test once per executor.  Module
scope makes pytest run all tests of one executor together, so the Dask cluster (separate
``dask scheduler`` / ``dask worker`` processes) exists only while its tests run and never
counts as a leftover of a local-pool test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from dask_cluster import ALLOWED_FAILURES, ROOT, TESTS, RealCluster
from executors import EXECUTORS, WORKERS, Executor
from procs import leftover_children

HERE = os.path.dirname(os.path.abspath(__file__))
# Workers import this directory's modules (the suite's helpers) as the driver does.
DASK_ENV = {**ALLOWED_FAILURES, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), HERE])}


@pytest.fixture(scope="module", params=EXECUTORS)
def executor(request, tmp_path_factory) -> Iterator[Executor]:
    if request.param != "dask":
        yield Executor(request.param)
        return
    cluster = RealCluster(tmp_path_factory.mktemp("dask"), WORKERS, env=DASK_ENV)
    client = None
    try:
        client = cluster.client(workers=WORKERS)
        yield Executor("dask", cluster, client)
    finally:
        if client is not None:
            client.close()
        cluster.close()
        leftovers = leftover_children(10.0)
        assert not leftovers, "the Dask cluster left processes behind"


def pytest_collection_modifyitems(items):
    """A test on the module's Dask cluster has its processes checked when the cluster closes."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("executor") == "dask":
            item.add_marker(pytest.mark.shared_cluster)
