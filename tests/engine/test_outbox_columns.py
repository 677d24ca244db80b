"""The outbox's plain successes are appended without a lock: no item is lost, doubled or misaligned.

``Outbox.add_succeeded`` runs on the chunk's thread while the flusher thread (or a sync)
takes the waiting items.  Here both run flat out with the interpreter switching threads
every microsecond, and every item must reach the channel exactly once, in order, with its
record and value beside it.
"""

from __future__ import annotations

import sys
import threading

import pytest

from durable_mp.engine import worker as worker_module
from durable_mp.engine.protocol import Succeeded

pytestmark = [pytest.mark.process_free, pytest.mark.timeout(120)]


class _Channel:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, msg, gathered: bool = False) -> None:
        self.sent.append(msg)


def _taken(channel: _Channel) -> tuple[list, list, list]:
    indices, records, values = [], [], []
    for msg in channel.sent:
        if msg.succeeded is not None:
            assert msg.succeeded.indices, "an empty Succeeded was sent"
            indices += msg.succeeded.indices
            records += msg.succeeded.records
            values += msg.succeeded.values
    return indices, records, values


@pytest.mark.parametrize("own_flushes", [False, True])
def test_every_item_reaches_the_driver_once_and_aligned_while_another_thread_takes(monkeypatch, own_flushes):
    # own_flushes: the adding thread also sends when its interval is up, as in a worker
    monkeypatch.setattr(worker_module, "OUTBOX_FLUSH_SECONDS", 0.0 if own_flushes else 1e9)
    channel = _Channel()
    outbox = worker_module.Outbox(channel)
    outbox.flusher = threading.current_thread()  # no flusher thread of its own: the taker below is it
    n = 60_000
    done = threading.Event()

    def taker() -> None:
        while not done.is_set():
            outbox.flush()
        outbox.flush()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=taker)
    try:
        thread.start()
        for index in range(n):
            outbox.add_succeeded(index, b"r%d" % index, -index)
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(switch)
    outbox.chunk_done([], 0.0)
    indices, records, values = _taken(channel)
    assert indices == list(range(n))
    assert records == [b"r%d" % i for i in range(n)]
    assert values == [-i for i in range(n)]
    assert outbox.succeeded == Succeeded([], [], [])
    assert sum(1 for m in channel.sent if m.succeeded is not None) > 1  # the two threads really interleaved


def test_a_partly_appended_item_stays_for_the_next_message():
    outbox = worker_module.Outbox(_Channel())
    outbox.succeeded.indices.append(7)  # the adding thread was interrupted after its first append
    outbox.succeeded.records.append(b"r7")
    assert worker_module._cut(outbox.succeeded) is None
    outbox.succeeded.values.append(70)
    assert worker_module._cut(outbox.succeeded) == Succeeded([7], [b"r7"], [70])
    assert outbox.succeeded == Succeeded([], [], [])
