"""Shared fixtures: a fresh store per test, and a check that no worker process outlives it."""

from __future__ import annotations

import os
import time

import psutil
import pytest


@pytest.fixture
def store_path(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Every test must leave no child process (worker or driver subprocess) behind."""
    yield
    me = psutil.Process(os.getpid())
    deadline = time.monotonic() + 5.0
    alive = []
    while time.monotonic() < deadline:
        alive = [p for p in me.children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.05)
    for proc in alive:
        proc.kill()
    assert not alive, f"processes left behind: {[(p.pid, p.cmdline()) for p in alive]}"
