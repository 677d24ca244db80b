"""The physical limits a scenario is measured against (issue 23 target 6), timed in the same run.

* ``pipe_seconds``: the same bytes sent through one raw ``multiprocessing`` Pipe to a
  forked child that reads them (what any process pool's transfer is bounded by);
* ``fdatasync_batch_seconds``: the same bytes written to one file with a single
  ``fdatasync`` for the whole batch (the disk's bound when every result of a batch may be
  synced together; ``payload``'s own ``fdatasync`` variant syncs per array);
* ``lmdb_commit_seconds``: LMDB alone, records of a given size put one per committed
  (synced) write transaction, and all of them in one: the cost of a durable record with no
  batching, and with perfect batching.

Each returns wall seconds; the scenario reports its durable_mp row's ratio to it.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from typing import Any


def _drain(conn: Any, count: int) -> None:
    for _ in range(count):
        conn.recv_bytes()
    conn.send_bytes(b"done")


def pipe_seconds(buffers: list[Any]) -> float:
    """Seconds to send ``buffers`` (one message each) through a Pipe to a child that reads them all."""
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_drain, args=(theirs, len(buffers)), daemon=True)
    child.start()
    theirs.close()
    try:
        t0 = time.perf_counter()
        for buf in buffers:
            ours.send_bytes(buf)
        ours.recv_bytes()
        return time.perf_counter() - t0
    finally:
        ours.close()
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()


def fdatasync_batch_seconds(arrays: list[list[Any]], directory: str) -> float:
    """Seconds to write every array's parts to one new file in ``directory``, then one ``fdatasync``."""
    root = tempfile.mkdtemp(prefix="durable_mp-bench-limit-", dir=directory)
    try:
        fd = os.open(os.path.join(root, "batch"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            t0 = time.perf_counter()
            for parts in arrays:
                for part in parts:
                    view = memoryview(part).cast("B")
                    while view.nbytes:
                        view = view[os.write(fd, view):]
            os.fdatasync(fd)
            return time.perf_counter() - t0
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def lmdb_commit_seconds(records: int, size: int, directory: str, *, per_record: bool) -> float:
    """Seconds to put ``records`` values of ``size`` bytes into a fresh LMDB (synced commits):
    one write transaction each (``per_record``), or all in one."""
    import lmdb

    root = tempfile.mkdtemp(prefix="durable_mp-bench-lmdb-", dir=directory)
    value = b"x" * size
    try:
        env = lmdb.open(root, map_size=1 << 30, sync=True, metasync=True)
        try:
            t0 = time.perf_counter()
            if per_record:
                for k in range(records):
                    with env.begin(write=True) as txn:
                        txn.put(b"%012d" % k, value)
            else:
                with env.begin(write=True) as txn:
                    for k in range(records):
                        txn.put(b"%012d" % k, value)
            return time.perf_counter() - t0
        finally:
            env.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ratio(measured: float | None, limit: float | None) -> float | None:
    """How many times the limit's time durable_mp took (1.0: at the limit)."""
    if measured is None or not limit:
        return None
    return round(measured / limit, 3)
