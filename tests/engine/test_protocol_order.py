"""Worker ↔ driver messages: in the order their records were produced (issue 18 defect 2), replies
matched by request id, and a result that is the value at return.

The worker's ``Outbox`` is shared by every thread of a branch (nested parallels run on
threads).  A record taken for a ``SyncRequest`` must reach the driver before any record
taken after it: otherwise an older STARTED overwrites a newer SUCCEEDED in the store.
Every message carries a per-worker sequence number, and the driver refuses a gap or a
reordering as a protocol error.
"""

from __future__ import annotations

import threading
import time
from multiprocessing import Pipe

import numpy as np
import pytest

from durable_mp import durable_execution
from durable_mp.config import StepConfig, StepSemantics
from durable_mp.core.records import OpRecord, OpStatus, OpType
from durable_mp.engine import protocol, wire
from durable_mp.engine import worker as w
from durable_mp.store.facade import Store

pytestmark = pytest.mark.timeout(30)


def _record(status: str) -> OpRecord:
    return OpRecord("s" * 64, "p" * 64, OpType.STEP, "Step", "step", status, time.time(), attempt=1)


def test_a_sync_request_is_sent_before_records_taken_after_it(monkeypatch):
    """Thread A syncs the STARTED record; while A is between taking its records and sending them,
    thread B adds the SUCCEEDED record and flushes.  The driver must see STARTED first."""
    driver_end, worker_end = Pipe()
    channel = w.Channel(worker_end)
    reader = threading.Thread(target=channel.read_forever, daemon=True)
    reader.start()
    outbox = w.Outbox(channel)
    taken = threading.Event()
    real_sync_request = w.SyncRequest

    def slow_sync_request(*args, **kwargs):  # A is descheduled right after taking its records
        taken.set()
        time.sleep(0.2)
        return real_sync_request(*args, **kwargs)

    monkeypatch.setattr(w, "SyncRequest", slow_sync_request)
    outbox.add(_record(OpStatus.STARTED))
    syncing = threading.Thread(target=outbox.sync)
    syncing.start()
    assert taken.wait(10)
    finisher = threading.Thread(target=lambda: (outbox.add(_record(OpStatus.SUCCEEDED)), outbox.flush()))
    finisher.start()

    received = []
    while len([r for m in received for r in m.nested]) < 2:
        assert driver_end.poll(10), "the worker sent nothing"
        msg = wire.recv(driver_end)
        received.append(msg)
        if isinstance(msg, protocol.SyncRequest):
            wire.send(driver_end, protocol.Reply(msg.request_id))
    syncing.join(10)
    finisher.join(10)
    statuses = [OpRecord.loads(data).status for m in received for _, _, data in m.nested]
    assert statuses == [OpStatus.STARTED, OpStatus.SUCCEEDED], f"arrival order {statuses}"
    assert [m.seq for m in received] == list(range(1, len(received) + 1))
    driver_end.close()
    worker_end.close()


def test_every_worker_message_kind_carries_a_sequence_number():
    worker_to_driver = [protocol.Records, protocol.ChunkDone, protocol.SyncRequest, protocol.CallbackWait,
                        protocol.WatchStart, protocol.WatchEnd, protocol.Log, protocol.CallResult]
    assert all("seq" in kind._fields for kind in worker_to_driver)


def test_the_driver_refuses_a_gap_or_a_reordering_of_a_workers_messages():
    seq = protocol.Sequence("worker pid 1")
    first, second, third = (protocol.Records(1, [], [], None, n) for n in (1, 2, 3))
    assert seq.check(first) is first
    with pytest.raises(protocol.ProtocolError, match="numbered 3 arrived after 1"):
        seq.check(third)  # a gap: message 2 was lost
    seq = protocol.Sequence("worker pid 1")
    seq.check(first)
    seq.check(second)
    with pytest.raises(protocol.ProtocolError, match="numbered 1 arrived after 2"):
        seq.check(first)  # an older message after a newer one
    with pytest.raises(protocol.ProtocolError):
        protocol.Sequence("w").check(protocol.Log({}, 0))  # an unnumbered message


def test_the_channel_numbers_messages_in_the_order_it_writes_them():
    driver_end, worker_end = Pipe()
    channel = w.Channel(worker_end)
    senders = [threading.Thread(target=lambda k=k: [channel.send(protocol.Log({"k": k, "i": i})) for i in range(50)])
               for k in range(4)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(10)
    check = protocol.Sequence("worker")
    for _ in range(200):
        check.check(wire.recv(driver_end))
    assert check.last == 200
    driver_end.close()
    worker_end.close()


@pytest.mark.timeout(120)
def test_nested_parallels_never_leave_a_started_record_under_a_finished_one(store_path):
    """End to end: nested parallels on threads of one worker, each step AT_MOST_ONCE (a sync per
    step).  No record may stay STARTED under a parent recorded SUCCEEDED (issue 18 defect 2)."""
    at_most_once = StepConfig(step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY)

    def leaf(c, i):
        return c.step(lambda s: i, name=f"leaf-{i}", config=at_most_once)

    def inner(c):
        return c.parallel([lambda cc, i=i: leaf(cc, i) for i in range(6)]).success_count

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([inner] * 6).get_results()

    for run in range(4):
        assert handler.run(run, store=store_path) == [6] * 6
        with Store(store_path) as st:
            records = {r.op_id: r for r in st.ops(handler.execution_id_for(run))}
        for rec in records.values():
            parent = records.get(rec.parent_id)
            if parent is not None and parent.status == OpStatus.SUCCEEDED:
                assert rec.is_terminal, f"{rec.name} is {rec.status} under {parent.name} SUCCEEDED"


# -- a result is a snapshot ------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_reused_output_buffer_gives_every_item_its_own_value(store_path):
    """A map function that fills one buffer and returns it: each result is the value at return."""
    out = np.zeros(32 * 1024, dtype=np.float64)  # 256 KiB: travels out of band

    def fill(ctx, x, i, xs):
        out[:] = x
        return out

    @durable_execution
    def handler(event, ctx):
        return ctx.map(list(range(40)), fill).get_results()

    results = handler.run(None, store=store_path)
    wrong = [i for i, r in enumerate(results) if not (r == i).all()]
    assert wrong == [], f"items whose result was overwritten after they returned: {wrong}"


# -- replies are matched by request id, not by position -------------------------------------
@pytest.mark.timeout(120)
def test_at_most_once_steps_in_a_large_map_do_not_hang(store_path):
    """A sync request (AT_MOST_ONCE START) while a prefetched chunk sits in the pipe."""
    cfg = StepConfig(step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY)

    def item(ctx, x, i, xs):
        return ctx.step(lambda s: x * 2, name="double", config=cfg)

    @durable_execution
    def handler(event, ctx):
        return ctx.map(list(range(200)), item).get_results()

    assert handler.run(None, store=store_path) == [2 * x for x in range(200)]


@pytest.mark.process_free
def test_a_message_the_driver_does_not_know_is_a_protocol_error_not_ignored():
    """Matching on message classes must not fall through silently: a worker sending something
    the driver has no case for (a version mismatch, a corrupt frame) is an internal error."""
    from types import SimpleNamespace

    from durable_mp.engine.dispatcher import Dispatcher

    class Unknown:
        pass

    worker = SimpleNamespace(task=None, pid=4242)
    with pytest.raises(protocol.ProtocolError, match="4242 sent a Unknown"):
        Dispatcher._handle(SimpleNamespace(), worker, Unknown())
    Dispatcher._handle(SimpleNamespace(), worker, protocol.CallResult(7, True, b""))  # a timed-out call's late result
