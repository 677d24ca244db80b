"""Shared fixtures: a fresh store per test, and a check that no worker process outlives it."""

from __future__ import annotations

import pytest

from procs import leftover_children


@pytest.fixture
def store_path(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture(autouse=True)
def no_leftover_processes(request):
    """Every test must leave no child process (worker or driver subprocess) behind.

    Tests on a shared Dask cluster (marker ``shared_cluster``) are checked when the
    cluster fixture closes instead.
    """
    yield
    if request.node.get_closest_marker("shared_cluster"):
        return
    alive = leftover_children()
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"
