"""``max_worker_memory``: a worker over the limit ends, what it shares with the driver does not count.

Real workers that really grow (pages touched, not only reserved).  The same limit under
every executor is in ``tests/behaviour``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from durable_mp import BatchItemStatus, durable_execution
from durable_mp.config import CompletionConfig, ParallelConfig, StepConfig
from durable_mp.retries import RetryPresets

pytestmark = pytest.mark.timeout(120)

ALL_COMPLETED = ParallelConfig(completion_config=CompletionConfig.all_completed())
NO_RETRY = StepConfig(retry_strategy=RetryPresets.none())


def test_a_worker_grown_past_the_memory_limit_never_runs_another_branch(store_path, tmp_path):
    from durable_mp.config import CompletionConfig

    hoard = []
    marker = tmp_path / "grow-pid"

    def grow(ctx):
        marker.write_text(str(os.getpid()))
        block = bytearray(200 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        hoard.append(block)  # stays alive in the worker after the branch returns
        return os.getpid()

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([grow, lambda c: os.getpid()], config=ParallelConfig(
            max_concurrency=1, completion_config=CompletionConfig.all_completed()))

    r = handler.run(None, store=store_path, max_workers=1, max_worker_memory=150 * 2**20)
    grown_pid = int(marker.read_text())
    # killed while growing (memory poll) or recycled right after: either way a fresh worker runs branch 1
    first, second = r.all
    if first.status == BatchItemStatus.FAILED:
        assert first.error.type.endswith("MemoryLimitExceededError"), first.error
    else:
        assert first.result == grown_pid
    assert second.status == BatchItemStatus.SUCCEEDED, second.error
    assert second.result != grown_pid, "the grown worker ran another branch"


def test_memory_limit_inside_a_step_goes_to_the_retry_strategy(store_path):
    def hog(step_ctx):
        block = bytearray(600 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(30)

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([lambda c: c.step(hog, name="hog", config=NO_RETRY)], config=ALL_COMPLETED)

    r = handler.run(None, store=store_path, max_worker_memory=300 * 2**20)
    assert r.all[0].status == BatchItemStatus.FAILED
    assert r.all[0].error.type == "durable_mp.exceptions.StepError"
    assert "MiB" in r.all[0].error.message


# -- the limit counts what the worker owns ---------------------------------------------------
_SHARED: dict = {}  # module level: branches below are pickled by reference and read the forked copy


def _touch_shared(ctx):
    return float(_SHARED["ballast"][:1000].sum())  # reads shared pages: RSS grows, USS does not


def _read_all_shared(ctx):
    return float(_SHARED["ballast"].sum())


def test_memory_limit_does_not_count_pages_shared_with_the_driver(store_path):
    _SHARED["ballast"] = ballast = np.ones(300 * 2**20 // 8)  # 300 MiB in the driver, shared copy-on-write
    try:
        @durable_execution(max_worker_memory=200 * 2**20)
        def handler(event, ctx):
            return ctx.parallel([_touch_shared, _read_all_shared]).get_results()

        assert handler.run(None, store=store_path) == [1000.0, float(len(ballast))]
    finally:
        _SHARED.clear()
