"""A worker that has reported every branch of a finished batch serves the next batch.

When a batch completes, the workers still holding one of its chunks are killed (early
completion: their branches must not go on).  A worker whose every branch has reported is
only sending its ChunkDone; killing it made the next batch start a new worker, which under
spawn or forkserver is a new interpreter boot (issue 23 target 4).  The race is made
certain here: the worker's records travel first, its ChunkDone a moment later.
"""

from __future__ import annotations

import time

import pytest

from durable_mp import durable_execution
from durable_mp.engine import worker as worker_module
from durable_mp.engine.pool import WorkerPool

pytestmark = pytest.mark.timeout(120)


def plus_one(ctx, x, index, items):
    return x + 1


@durable_execution(start_method="fork", max_workers=1)
def two_batches(event, ctx):
    return ctx.map([1], plus_one).get_results(), ctx.map([2], plus_one).get_results()


def test_a_worker_whose_branches_all_reported_is_not_killed_at_batch_end(store_path, monkeypatch):
    real_done = worker_module.Outbox.chunk_done

    def late_chunk_done(self, *args, **kwargs):  # runs in the forked worker: records first, ChunkDone later
        self.flush()
        time.sleep(0.02)  # well inside the dispatcher's CHUNK_END_WAIT_SECONDS
        real_done(self, *args, **kwargs)

    monkeypatch.setattr(worker_module.Outbox, "chunk_done", late_chunk_done)
    started, killed = [], []
    real_add, real_kill = WorkerPool._add, WorkerPool.kill
    monkeypatch.setattr(WorkerPool, "_add", lambda self, *a: (started.append(a[0]), real_add(self, *a))[1])
    monkeypatch.setattr(WorkerPool, "kill", lambda self, w: (killed.append(w.pid), real_kill(self, w))[1])
    assert two_batches.run(None, store=store_path) == ([2], [3])
    assert len(started) == 1 and killed == []  # one worker served both batches, and quit at the end
