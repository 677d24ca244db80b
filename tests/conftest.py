"""Shared fixtures: a fresh store per test, a check that no worker process outlives it, and
a check that a test marked ``process_free`` really starts no process.

Tests are grouped by subject in subdirectories (``engine``, ``store``, ``api``, ...);
their shared helpers are ``util.py`` and ``procs.py`` here (``pythonpath = tests``).
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess

import _posixsubprocess
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


@pytest.fixture(autouse=True)
def starts_no_process(request, monkeypatch):
    """A ``process_free`` test fails if it forks, spawns or asks a fork server for a process."""
    if not request.node.get_closest_marker("process_free"):
        yield
        return
    from durable_mp.engine import start

    started: list[str] = []

    def counted(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            started.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    counted(os, "fork")
    counted(_posixsubprocess, "fork_exec")  # multiprocessing's spawn and forkserver
    counted(subprocess, "_fork_exec")  # subprocess binds fork_exec when it is imported
    if hasattr(os, "posix_spawn"):
        counted(os, "posix_spawn")
    counted(multiprocessing.process.BaseProcess, "start")
    counted(start.ForkServer, "request")  # a worker from a fork server another test started
    yield
    assert not started, f"a process_free test started processes: {started}"
