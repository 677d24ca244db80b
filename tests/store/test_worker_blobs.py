"""Large results a worker writes into the store's directory itself (engine.result_blobs, store.worker_blobs).

Durable before their reference leaves the worker, checked by the driver, read back with
their checksum, crash-safe (a torn tail is never referred to and is cut later), private
files in private directories, snapshots of the value at return, and gone with their execution.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading
import time

import lmdb
import numpy as np
import pytest

from durable_mp import durable_execution
from durable_mp.core import blob_ref
from durable_mp.core.records import OpRecord, OpStatus, OpType
from durable_mp.engine import result_blobs
from durable_mp.exceptions import StoreError
from durable_mp.serdes import pickle_parts, unpickle
from durable_mp.store import blobs
from durable_mp.store.facade import Store
from util import execution_record, run_cli

pytestmark = pytest.mark.timeout(180)

BIG = 2 * result_blobs.WORKER_BLOB_BYTES  # bytes of float64 in a result the worker writes itself


def raw_values(path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=8)
    try:
        db = env.open_db(b"ops", create=False)
        with env.begin() as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}
    finally:
        env.close()


def worker_refs(path) -> list[blob_ref.Ref]:
    return [blob_ref.parse(v) for v in raw_values(path).values() if v[:len(blob_ref.V2)] == blob_ref.V2]


def item_record(value, op_id: str = "op") -> OpRecord:
    return OpRecord(op_id, "batch", OpType.CONTEXT, "MapIteration", "item", OpStatus.SUCCEEDED, 1.0, 2.0,
                    pickle_parts(value), None, 1)


def appender(store_path, exec_id: str = "e") -> result_blobs.Appender:
    return result_blobs.Appender(str(store_path), exec_id)


# -- the worker's writes -----------------------------------------------------------------------
@pytest.mark.process_free
def test_a_new_files_names_are_synced_before_it_is_written_and_its_records_before_the_next_message(
        tmp_path, monkeypatch):
    events: list[str] = []
    real_fdatasync, real_fsync_dir, real_pwrite = os.fdatasync, result_blobs.fsync_dir, result_blobs.pwrite_all
    monkeypatch.setattr(result_blobs.os, "fdatasync", lambda fd: (events.append("data"), real_fdatasync(fd))[1])
    monkeypatch.setattr(result_blobs, "fsync_dir", lambda p: (events.append(f"dir {p}"), real_fsync_dir(p))[1])
    monkeypatch.setattr(result_blobs, "pwrite_all", lambda *a: (events.append("write"), real_pwrite(*a))[1])
    Store(tmp_path / "s").close()
    sink = appender(tmp_path / "s")
    monkeypatch.setattr(result_blobs, "_SINK", [sink])
    written = sink.write(item_record(np.arange(BIG // 8, dtype=np.float64)))
    top = os.path.join(tmp_path / "s", "blobs")
    assert events == [f"dir {os.path.join(top, blob_ref.exec_dir_name(b'e'))}", f"dir {top}", f"dir {tmp_path / 's'}",
                      "write"]
    result_blobs.before_send()  # the worker's next message (the one with the reference) waits for this
    assert events[-1] == "data"
    events.clear()
    sink.write(item_record(np.arange(BIG // 8, dtype=np.float64)))
    sink.write(item_record(np.arange(BIG // 8, dtype=np.float64)))
    result_blobs.before_send()
    result_blobs.before_send()  # nothing written since: no sync
    assert events == ["write", "write", "data"], "one sync per message, an append names nothing new"
    ref = blob_ref.parse(written.ref)
    assert ref.crc is not None and ref.name.startswith("w") and ref.offset == 0


@pytest.mark.process_free
def test_a_message_sent_while_another_threads_sync_runs_waits_for_that_sync(tmp_path, monkeypatch):
    """The flusher took reference R and syncs; the main thread's message may hold R too: it must wait."""
    sink = appender(tmp_path)
    monkeypatch.setattr(result_blobs, "_SINK", [sink])
    sink.write(item_record(np.zeros(BIG // 8)))
    started, ended = threading.Event(), []
    real_fdatasync = os.fdatasync

    def slow(fd):
        started.set()
        time.sleep(0.3)
        real_fdatasync(fd)
        ended.append(time.monotonic())

    monkeypatch.setattr(result_blobs.os, "fdatasync", slow)
    flusher = threading.Thread(target=result_blobs.before_send)
    flusher.start()
    assert started.wait(10)
    result_blobs.before_send()  # another message, sent while that sync runs
    returned = time.monotonic()
    flusher.join()
    assert ended and returned >= ended[0], "a message left before the sync covering its references ended"


SYNC_FAILS = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from durable_mp.core.records import OpRecord
    from durable_mp.engine import result_blobs
    from durable_mp.serdes import pickle_parts

    sink = result_blobs.Appender(sys.argv[1], "e")
    sink.write(OpRecord("op", "batch", "CONTEXT", "MapIteration", "item", "SUCCEEDED", 1.0, 2.0,
                        pickle_parts(np.zeros(1 << 18)), None, 1))

    def failing(fd):
        raise OSError(5, "Input/output error")

    os.fdatasync = failing
    result_blobs._SINK[0] = sink
    result_blobs.before_send()  # the worker's next message
    print("a message left after its sync failed", flush=True)
    """
)


@pytest.mark.timeout(60)
def test_a_worker_whose_blob_sync_fails_exits_before_any_reference_leaves(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    run = subprocess.run([sys.executable, "-c", SYNC_FAILS, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == result_blobs.SYNC_FAILED_EXIT, run.stdout + run.stderr
    assert "a message left" not in run.stdout and "syncing its blob file" in run.stderr


@pytest.mark.process_free
def test_records_start_on_a_page_and_their_array_on_a_cache_line(tmp_path):
    sink = appender(tmp_path)
    refs = [blob_ref.parse(sink.write(item_record(np.full(BIG // 8 + k, float(k)))).ref) for k in range(3)]
    assert [r.offset % 4096 for r in refs] == [0, 0, 0] and refs[1].offset > refs[0].offset
    for k, ref in enumerate(refs):
        data = blobs.load(tmp_path, blob_ref.pack_v2(ref.offset, ref.size, ref.crc, ref.rel), "x")
        rec = OpRecord.loads(data)
        value = unpickle(rec.result)
        assert value.shape == (BIG // 8 + k,) and (value == k).all()
    path = tmp_path / refs[0].rel
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path.parent.parent).st_mode) == 0o700


@pytest.mark.process_free
@pytest.mark.parametrize("unsafe", ["group-writable", "symlink"])
def test_an_unsafe_blob_directory_is_refused_and_results_take_the_pipe(tmp_path, unsafe):
    top = tmp_path / "blobs"
    if unsafe == "group-writable":
        top.mkdir()
        os.chmod(top, 0o770)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        top.symlink_to(tmp_path / "elsewhere")
    sink = appender(tmp_path)
    assert sink.write(item_record(np.zeros(BIG // 8))) is None
    assert sink.refused and not sink.takes(pickle_parts(np.zeros(BIG // 8)))
    assert not any((tmp_path / "elsewhere").rglob("*.blob")) if unsafe == "symlink" else not any(top.iterdir())


@pytest.mark.process_free
def test_a_file_swept_meanwhile_is_never_appended_to(tmp_path):
    sink = appender(tmp_path)
    first = blob_ref.parse(sink.write(item_record(np.zeros(BIG // 8))).ref)
    os.unlink(tmp_path / first.rel)  # a sweep or a delete between two results
    second = blob_ref.parse(sink.write(item_record(np.ones(BIG // 8))).ref)
    assert second.rel != first.rel and (tmp_path / second.rel).exists()


@pytest.mark.process_free
def test_a_file_whose_write_failed_is_never_written_again_and_what_it_held_is_synced(tmp_path, monkeypatch):
    events: list[str] = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(result_blobs.os, "fdatasync", lambda fd: (events.append("data"), real_fdatasync(fd))[1])
    sink = appender(tmp_path)
    first = blob_ref.parse(sink.write(item_record(np.zeros(BIG // 8))).ref)  # its reference waits for a sync

    def failing(*args):
        raise OSError(28, "No space left on device")

    real_pwrite = result_blobs.pwrite_all
    monkeypatch.setattr(result_blobs, "pwrite_all", failing)
    assert sink.write(item_record(np.ones(BIG // 8))) is None  # this result takes the pipe
    assert events == ["data"], "the first record's reference may still leave: it was synced"
    monkeypatch.setattr(result_blobs, "pwrite_all", real_pwrite)
    third = blob_ref.parse(sink.write(item_record(np.ones(BIG // 8))).ref)
    assert third.rel != first.rel


# -- the driver's side ---------------------------------------------------------------------------
@pytest.mark.process_free
def test_the_driver_refuses_a_reference_that_is_not_its_executions_worker_file(tmp_path):
    sink = appender(tmp_path, "other")
    ref = sink.write(item_record(np.zeros(BIG // 8))).ref
    with pytest.raises(StoreError, match="not one of its own"):
        result_blobs.take(tmp_path, "e", ref)  # another execution's file
    parsed = blob_ref.parse(ref)
    beyond = blob_ref.pack_v2(parsed.offset, parsed.size + 4096, parsed.crc, parsed.rel)
    with pytest.raises(StoreError, match="fewer than"):
        result_blobs.take(tmp_path, "other", beyond)
    os.chmod(tmp_path / parsed.rel, 0o644)
    with pytest.raises(StoreError, match="not a private file"):
        result_blobs.take(tmp_path, "other", ref)


@pytest.mark.process_free
def test_a_taken_value_is_private_and_its_reference_is_what_is_committed(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        store.acquire("e", lambda: execution_record("e"))
        ref = appender(path).write(item_record(np.arange(BIG // 8, dtype=np.float64))).ref
        blob, value = result_blobs.take(path, "e", ref)
        assert value.flags.writeable and value.flags.aligned and value[5] == 5.0
        value[:] = -1  # the caller changes its result: neither the file nor the record sees it
        store.stage_raw("e", "batch", "#000000000000", blob)
        assert unpickle(store.get_op("e", "batch", "#000000000000").result)[5] == 5.0  # staged: read in place
        store.flush()
    assert list(raw_values(path).values()) == [ref], "the worker's reference is committed as it is"
    with Store(path, readonly=True) as store:
        assert unpickle(store.get_op("e", "batch", "#000000000000").result)[5] == 5.0


@pytest.mark.process_free
def test_where_files_cannot_be_mapped_the_driver_reads_the_record_and_commits_it_itself(tmp_path, monkeypatch):
    from durable_mp.store import worker_blobs

    class Unmappable(blobs.InPlace):
        def __new__(cls, *args, **kwargs):
            raise OSError(19, "No such device")  # what mmap says on a file system without it

    monkeypatch.setattr(worker_blobs, "InPlace", Unmappable)
    path = tmp_path / "s"
    with Store(path) as store:
        store.acquire("e", lambda: execution_record("e"))
        ref = appender(path).write(item_record(np.arange(BIG // 8, dtype=np.float64))).ref
        data, value = result_blobs.take(path, "e", ref)
        assert value is result_blobs.UNDECODED and unpickle(OpRecord.loads(data).result)[7] == 7.0
        store.stage_raw("e", "batch", "#000000000000", data)
        store.flush()
        assert unpickle(store.get_op("e", "batch", "#000000000000").result)[7] == 7.0
    [stored] = raw_values(path).values()
    assert stored.startswith(blob_ref.V1), "the driver's own copy is what is committed"


@pytest.mark.process_free
def test_a_damaged_worker_blob_is_a_store_error_on_read(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        store.acquire("e", lambda: execution_record("e"))
        ref = appender(path).write(item_record(np.arange(BIG // 8, dtype=np.float64))).ref
        store.stage_raw("e", "batch", "#000000000000", result_blobs.take(path, "e", ref)[0])
        store.flush()
    parsed = blob_ref.parse(ref)
    with open(path / parsed.rel, "r+b") as f:
        f.seek(parsed.offset + parsed.size - 100)
        f.write(b"\xff")
    with Store(path, readonly=True) as store:
        with pytest.raises(StoreError, match="damaged"):
            store.get_op("e", "batch", "#000000000000")


@pytest.mark.process_free
def test_sweep_cuts_torn_tails_off_worker_files_and_removes_unreferenced_ones(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        store.acquire("e", lambda: execution_record("e"))
        kept = appender(path)
        ref = kept.write(item_record(np.ones(BIG // 8))).ref
        store.stage_raw("e", "batch", "#000000000000", result_blobs.take(path, "e", ref)[0])
        store.flush()
        end = blob_ref.parse(ref).offset + blob_ref.parse(ref).size
        kept.write(item_record(np.zeros(BIG // 8)))  # written, never committed (its driver died)
        with open(path / blob_ref.parse(ref).rel, "ab") as f:
            f.write(b"torn" * 1000)  # and a worker killed mid-write after it
        orphan = appender(path).write(item_record(np.zeros(BIG // 8))).ref  # a file nothing refers to
        store.release("e")
        store.acquire("e", lambda: execution_record("e"))  # taking the execution sweeps it
        assert os.path.getsize(path / blob_ref.parse(ref).rel) == end
        assert not (path / blob_ref.parse(orphan).rel).exists()
        assert unpickle(store.get_op("e", "batch", "#000000000000").result)[0] == 1.0
        assert store.sweep_blobs("e") == 0


# -- real runs -----------------------------------------------------------------------------------
def big_array(ctx, x, i, xs):
    return np.full(BIG // 8, float(x))


def big_value(x):
    return np.full(BIG // 8, float(x))


@durable_execution
def arrays_handler(event, ctx):
    r = ctx.map(list(range(event["n"])), big_array, name="arrays")
    r.throw_if_error()
    return [(float(a[0]), float(a[-1]), a.shape[0]) for a in r.get_results()]


@pytest.mark.timeout(120)
def test_large_map_results_are_written_by_the_workers_not_by_the_driver(tmp_path):
    path = tmp_path / "s"
    n = 6
    assert arrays_handler.run({"n": n}, store=str(path), execution_id="e", max_workers=2) == [
        (float(i), float(i), BIG // 8) for i in range(n)]
    refs = worker_refs(path)
    assert len(refs) == n and all(r.name.startswith("w") for r in refs)
    files = os.listdir(blobs.exec_dir(path, "e"))
    assert files and all(name.startswith("w") for name in files), f"the driver wrote blob files: {files}"
    with Store(path, readonly=True) as store:  # and they read back, checksum included
        items = [r for r in store.ops("e") if r.parent_id and r.status == "SUCCEEDED"]
        assert sorted(float(unpickle(r.result)[0]) for r in items) == [float(i) for i in range(n)]
    cli = run_cli("check", "e", store=path)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    cli = run_cli("delete", "e", store=path)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert not blobs.exec_dir(path, "e").exists()


@pytest.mark.timeout(120)
def test_a_reused_large_output_buffer_gives_every_item_its_own_value(tmp_path):
    """The snapshot holds on the worker's own path too: each result is the buffer as it was at return."""
    out = np.zeros(BIG // 8, dtype=np.float64)

    def fill(ctx, x, i, xs):
        out[:] = x
        return out

    @durable_execution
    def handler(event, ctx):
        results = ctx.map(list(range(12)), fill).get_results()
        first = [float(r[0]) for r in results]
        for r in results:
            r[:] = -1  # the caller changes the results it got: the store keeps what was returned
        return first

    path = tmp_path / "s"
    assert handler.run(None, store=str(path), execution_id="e") == [float(i) for i in range(12)]
    assert len(worker_refs(path)) == 12
    with Store(path, readonly=True) as store:
        values = sorted(float(unpickle(r.result)[-1]) for r in store.ops("e") if r.parent_id and r.result)
    assert values == [float(i) for i in range(12)]


@pytest.mark.timeout(120)
def test_durable_mp_map_results_take_the_workers_path(tmp_path):
    import durable_mp

    path = tmp_path / "s"
    out = durable_mp.map(big_value, [1.0, 2.0, 3.0, 4.0], store=str(path), max_workers=2)
    assert [float(a[0]) for a in out] == [1.0, 2.0, 3.0, 4.0] and all(a.shape == (BIG // 8,) for a in out)
    assert len(worker_refs(path)) == 4


TORN_JOB = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from durable_mp import durable_execution
    from durable_mp.engine import result_blobs

    MARK = sys.argv[2]

    def torn(fd, parts, offset):
        # half of the record reaches the file, then the worker dies: a torn tail
        half = sum(p.nbytes for p in parts) // 2
        os.pwrite(fd, b"".join(bytes(p) for p in parts)[:half], offset)
        os.kill(os.getpid(), signal.SIGKILL)

    def make(ctx, x, i, xs):
        if x == 3 and not os.path.exists(MARK):
            open(MARK, "w").close()
            result_blobs.pwrite_all = torn  # in this worker only
        return np.full(2 * 1024 * 1024 // 8 * 2, float(x))

    @durable_execution
    def handler(event, ctx):
        r = ctx.map(list(range(8)), make, name="arrays")
        r.throw_if_error()
        return [(float(a[0]), float(a[-1])) for a in r.get_results()]

    if __name__ == "__main__":
        print(handler.run({}, store=sys.argv[1], execution_id="e", max_workers=2), flush=True)
    """
)


def test_a_worker_killed_mid_write_leaves_a_tail_nothing_refers_to_and_the_sweep_cuts_it(tmp_path):
    script, path, mark = tmp_path / "job.py", tmp_path / "s", tmp_path / "killed"
    script.write_text(TORN_JOB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    run = subprocess.run([sys.executable, str(script), str(path), str(mark)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert mark.exists(), "the worker never reached its torn write"
    assert run.stdout.strip() == str([(float(i), float(i)) for i in range(8)])
    refs = worker_refs(path)
    # the re-run of the killed item keeps the crash in its record: the driver rewrites that one (its own file)
    assert len(refs) == 7 and sum(1 for v in raw_values(path).values() if blob_ref.is_ref(v)) == 8
    ends: dict[str, int] = {}
    for ref in refs:
        ends[ref.rel] = max(ends.get(ref.rel, 0), ref.offset + ref.size)
    folder = blobs.exec_dir(path, "e")
    sizes = {f"blobs/{folder.name}/{name}": os.path.getsize(folder / name) for name in os.listdir(folder)
             if name.startswith("w")}
    torn = {rel: size for rel, size in sizes.items() if size > ends.get(rel, 0)}
    assert torn, f"no file holds the torn record: {sizes} {ends}"
    with Store(path) as store:  # the next time the execution is taken: tails cut, orphans removed
        store.acquire("e", lambda: execution_record("e"))
        store.release("e")
        sizes = {f"blobs/{folder.name}/{name}": os.path.getsize(folder / name) for name in os.listdir(folder)
                 if name.startswith("w")}
        assert sizes == ends
        items = [r for r in store.ops("e") if r.parent_id and r.status == "SUCCEEDED"]
        assert sorted(float(unpickle(r.result)[0]) for r in items) == [float(i) for i in range(8)]


def test_check_reports_a_damaged_worker_blob(tmp_path):
    path = tmp_path / "s"
    arrays_handler.run({"n": 2}, store=str(path), execution_id="e", max_workers=1)
    ref = worker_refs(path)[0]
    with open(path / ref.rel, "r+b") as f:
        f.seek(ref.offset + ref.size // 2)
        f.write(b"\x01\x02\x03")
    cli = run_cli("check", "e", store=path)
    assert cli.returncode != 0 and "damaged" in cli.stdout + cli.stderr, cli.stdout + cli.stderr


@pytest.mark.timeout(180)
def test_the_dask_backend_keeps_results_on_the_pipe(tmp_path):
    """A Dask worker may run on another host: it never writes the driver's store, the driver does."""
    from dask_cluster import RealCluster
    from procs import leftover_children

    size = BIG // 8

    @durable_execution
    def handler(event, ctx):  # defined here: pickled by value for workers that cannot import this module
        r = ctx.map([0, 1], lambda c, x, i, xs: np.full(size, float(x)), name="arrays")
        return [(float(a[0]), float(a[-1]), a.shape[0]) for a in r.get_results()]

    cluster = RealCluster(tmp_path / "dask", 1)
    try:
        client = cluster.client(workers=1)
        try:
            path = tmp_path / "s"
            assert handler.run(None, store=str(path), execution_id="e", backend=client) == [
                (0.0, 0.0, BIG // 8), (1.0, 1.0, BIG // 8)]
        finally:
            client.close()
    finally:
        cluster.close()
    assert not leftover_children(10.0)
    refs = [v for v in raw_values(path).values() if blob_ref.is_ref(v)]
    assert len(refs) == 2 and worker_refs(path) == [], "a Dask worker wrote into the driver's store"
    assert not any(name.startswith("w") for name in os.listdir(blobs.exec_dir(path, "e")))
