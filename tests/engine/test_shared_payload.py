"""Large map inputs reach the workers as one memory file, not through every pipe (issue 23 target 3).

A map hands each item the whole input list (the reference's contract), so every worker
gets the batch payload.  From ``wire.SHARE_BYTES`` on it is built in a memfd whose
descriptor is passed over the socket; each worker maps it copy-on-write, and the map
inputs are views of that mapping (their buffers pickled out of band), not copies.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket

import numpy as np
import pytest

from durable_mp import durable_execution
from durable_mp.core.spec import BatchSpec
from durable_mp.engine import wire
from durable_mp.engine.payload import build_payload, load_source
from durable_mp.engine.start import START_METHODS

METHODS = [m for m in START_METHODS if m in multiprocessing.get_all_start_methods()]
ROW = 1 << 17  # float64: 1 MiB per row


def _memfds() -> int:
    """How many payload memory files this process holds open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += "durable_mp-payload" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return count


@pytest.mark.process_free
def test_a_shared_frame_arrives_as_a_private_copy_on_write_mapping():
    a, b = socket.socketpair()
    try:
        data = bytes(range(256)) * 8192  # 2 MiB
        file = wire.memory_file(len(data), [(0, data[:1000]), (1000, data[1000:])])
        assert file[:] == data
        for n in (1, 2):  # the same file, sent twice
            shared = wire.shared_frame(wire.big([file]))
            assert shared is not None
            try:
                wire.send(a, {"payload": shared, "n": n}, gathered=True)
            finally:
                shared.close()
        assert wire.shared_frame(wire.big([data])) is None  # bytes travel through the pipe
        first, second = wire.recv(b), wire.recv(b)
        assert (first["n"], second["n"]) == (1, 2)
        assert bytes(first["payload"]) == data and bytes(second["payload"]) == data
        first["payload"][:4] = b"XXXX"  # copy-on-write: the other mapping still reads the original
        assert bytes(second["payload"][:4]) == data[:4]
    finally:
        a.close()
        b.close()


def _root(array):
    """The object that owns an array's memory (following views)."""
    owner = array
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    return owner.obj if isinstance(owner, memoryview) else owner


def _identity(ctx, x, index, inputs):
    return x


@pytest.mark.process_free
def test_map_inputs_are_views_of_the_payload_not_copies():
    rows = [np.full(ROW, i, dtype=np.float64) for i in range(3)]
    spec = BatchSpec(op_id="op", sub_type="Map", item_sub_type="MapIteration", name=None, n=3, names=None,
                     funcs=None, func=_identity, inputs=rows, item_serdes=None, max_concurrency=None,
                     branch_timeout=None, policy=None)
    payload = build_payload(spec, lambda index, error: pytest.fail(f"item {index}: {error}"))
    frame = bytearray(payload)  # what a worker reads from its pipe
    got = load_source(frame, "exec").inputs
    assert [float(r[0]) for r in got] == [0.0, 1.0, 2.0] and all(r.shape == (ROW,) for r in got)
    assert all(r.flags.writeable for r in got)
    assert all(_root(r) is frame for r in got), [type(_root(r)) for r in got]  # views, no copy was made
    start = np.frombuffer(frame, np.uint8).ctypes.data  # a mapping starts on a page: then each row on a cache line
    assert all((r.ctypes.data - start) % 64 == 0 for r in got)
    read_only = load_source(bytes(payload), "exec").inputs  # a Dask task gets bytes: still writable arrays
    assert all(r.flags.writeable for r in read_only) and float(read_only[2][5]) == 2.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_a_map_over_large_inputs_shares_them_and_closes_the_memory_files(method, store_path):
    rows = [np.full(ROW, i, dtype=np.float64) for i in range(6)]

    def item(ctx, row, index, inputs):
        row[0] = -1.0  # a worker's own copy-on-write page: no other worker and not the driver sees it
        owner = inputs[index]
        while isinstance(owner, np.ndarray) and owner.base is not None:
            owner = owner.base
        return float(row[1:].sum()) / (ROW - 1), type(owner.obj if isinstance(owner, memoryview) else owner).__name__

    @durable_execution(start_method=method, max_workers=2)
    def handler(event, ctx):
        return ctx.map(rows, item).get_results()

    before = _memfds()
    out = handler.run(None, store=store_path, execution_id="shared")
    assert [value for value, _ in out] == [float(i) for i in range(6)]
    assert {kind for _, kind in out} == {"mmap"}  # views of the mapped payload
    assert all(float(r[0]) == float(i) for i, r in enumerate(rows))  # the driver's arrays are untouched
    assert _memfds() == before  # no payload file outlives its batch in the driver


@pytest.mark.process_free
def test_a_large_payload_is_built_in_a_memory_file_that_is_shared_as_it_is():
    rows = [np.full(ROW, i, dtype=np.float64) for i in range(3)]
    spec = BatchSpec(op_id="op", sub_type="Map", item_sub_type="MapIteration", name=None, n=3, names=None,
                     funcs=None, func=_identity, inputs=rows, item_serdes=None, max_concurrency=None,
                     branch_timeout=None, policy=None)
    payload = build_payload(spec, lambda index, error: pytest.fail(f"item {index}: {error}"))
    assert isinstance(payload, wire.MemoryFile)
    shared = wire.shared_frame(wire.big([payload]))
    assert shared is not None
    try:
        assert os.fstat(shared.fd).st_ino == os.fstat(payload.fd).st_ino  # the same file: no copy
    finally:
        shared.close()
    as_bytes = pickle.loads(pickle.dumps(payload))  # what a Dask task receives
    assert type(as_bytes) is bytes and as_bytes == payload[:]
    assert [float(r[7]) for r in load_source(as_bytes, "exec").inputs] == [0.0, 1.0, 2.0]
