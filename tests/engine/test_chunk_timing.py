"""Chunk sizing learns an item's cost from the worker's own time for a chunk, not the round trip.

For tiny map items the round trip (driver → worker → driver) is most of a chunk's
time; taken as the items' cost it kept the chunks of a small map at a dozen items,
one round trip each.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import pytest

from durable_mp.engine import worker as w
from durable_mp.engine.batch_run import BatchRun
from durable_mp.engine.branch import BranchSource
from durable_mp.engine.protocol import UNLIMITED, ChunkDone, RunChunk
from durable_mp.engine.scheduling import chunk_size

pytestmark = pytest.mark.process_free  # no test here starts a process


class CapturingChannel:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, msg, gathered=False) -> None:
        self.sent.append(msg)


def item(ctx, x, index, inputs):
    time.sleep(0.002)
    return x


def test_a_chunk_done_reports_the_workers_own_seconds_for_the_chunk():
    channel = CapturingChannel()
    outbox = w.Outbox(channel)
    shared = w.WorkerShared(outbox, {"execution_id": "e"})
    source = BranchSource(funcs=None, func=item, inputs=list(range(5)), item_serdes=None, batch_op_id="b" * 64,
                          item_sub_type="MapIteration", names=None, execution_id="e")
    cache: OrderedDict = OrderedDict({"t": (source, [0, 0])})
    before = time.monotonic()
    w._run_chunk(RunChunk(1, "t", None, [0, 1, 2, 3, 4], None, None, UNLIMITED), shared, outbox, cache, [w.IDLE, 0],
                 set())
    elapsed = time.monotonic() - before
    done = [m for m in channel.sent if isinstance(m, ChunkDone)]
    assert len(done) == 1
    assert 5 * 0.002 <= done[0].seconds <= elapsed  # the items' time, nothing before or after the chunk
    # every item's outcome reaches the driver exactly once, before the ChunkDone or in it, never after it
    assert channel.sent[-1] is done[0] and all(m.task_id == 1 for m in channel.sent)
    reported = [(i, v) for m in channel.sent if m.succeeded is not None
                for i, v in zip(m.succeeded.indices, m.succeeded.values, strict=True)]
    assert sorted(reported) == [(i, i) for i in range(5)]


def test_chunks_grow_once_an_item_is_known_to_be_tiny():
    """What the driver does with it: 16 items that took the worker 80 µs make the rest one
    chunk; the same 16 items seen through a 1 ms round trip would make it several."""
    def next_chunk(seconds: float) -> int:
        run = BatchRun.__new__(BatchRun)
        run.item_seconds, run.cpu_share = None, None
        run.observe(seconds, 16)
        return chunk_size(84, 2, run.item_seconds, is_map=True, has_timeout=False)

    assert next_chunk(16 * 5e-6) == 84
    assert next_chunk(1e-3) < 84
