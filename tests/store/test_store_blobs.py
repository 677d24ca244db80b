"""Large checkpoint values in blob files: durable before their reference, read back, cleaned up, crash-safe."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import lmdb
import pytest

from durable_mp.core import blob_ref
from durable_mp.exceptions import StoreError
from durable_mp.store import blobs
from durable_mp.store.facade import Store
from procs import session_processes
from util import execution_record, step_record, wait_until

pytestmark = pytest.mark.timeout(180)

BIG = blobs.BLOB_BYTES + 17


def raw_values(path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=8)
    try:
        db = env.open_db(b"ops", create=False)
        with env.begin() as txn:
            return dict(txn.cursor(db=db))
    finally:
        env.close()


def committed_refs(path) -> int:
    """Blob references committed so far, read while a driver may be writing (LMDB readers are safe then)."""
    if not (path / "data.mdb").exists():
        return 0
    env = lmdb.open(str(path), readonly=True, max_dbs=8)
    try:
        try:
            db = env.open_db(b"ops", create=False)
        except lmdb.Error:
            return 0
        with env.begin() as txn:
            return sum(1 for v in txn.cursor(db=db).iternext(keys=False) if blobs.is_ref(v))
    finally:
        env.close()


def blob_files(path, exec_id="e") -> list[str]:
    try:
        return sorted(os.listdir(blobs.exec_dir(path, exec_id)))
    except FileNotFoundError:
        return []


@pytest.mark.process_free
def test_a_large_value_is_committed_as_a_reference_and_reads_back(tmp_path):
    path = tmp_path / "s"
    big, small = os.urandom(BIG), b"tiny"
    with Store(path, flush_seconds=60) as store:  # one batch however slow the machine is (flush() commits it)
        store.stage("e", step_record("a", "p", result=big))
        store.stage("e", step_record("b", "p", result=small))
        store.stage("e", step_record("c", "p", result=big[::-1]))
        store.flush()
    values = raw_values(path)
    refs = [v for v in values.values() if blobs.is_ref(v)]
    assert len(refs) == 2 and all(len(v) < 200 for v in refs)  # both large ones, one file for the batch
    assert len(blob_files(path)) == 1
    mode = stat.S_IMODE(os.stat(blobs.exec_dir(path, "e") / blob_files(path)[0]).st_mode)
    assert mode == 0o600
    with Store(path, readonly=True) as store:
        assert store.get_op("e", "p", "a").result == big
        assert store.get_op("e", "p", "b").result == small
        assert {r.op_id: r.result for r in store.children("e", "p")} == {"a": big, "b": small, "c": big[::-1]}
        assert len(store.ops("e")) == 3



@pytest.fixture
def sync_events(monkeypatch) -> list[str]:
    """What the blob writer syncs, in order: ``"blob"`` (fdatasync of a blob file), ``"dir"`` (fsync)."""
    events: list[str] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync
    monkeypatch.setattr(blobs.os, "fdatasync", lambda fd: (events.append("blob"), real_fdatasync(fd))[1])
    monkeypatch.setattr(blobs.os, "fsync", lambda fd: (events.append("dir"), real_fsync(fd))[1])
    return events
@pytest.mark.process_free
def test_the_blob_is_synced_before_the_transaction_that_refers_to_it(tmp_path, monkeypatch, sync_events):
    events = sync_events
    with Store(tmp_path / "s") as store:
        real_write = store._write
        monkeypatch.setattr(store, "_write", lambda fn: (events.append("commit"), real_write(fn))[1])
        store.stage("e", step_record("a", "p", result=os.urandom(BIG)))
        store.flush()
    first_commit = events.index("commit")
    assert "blob" in events[:first_commit] and events[first_commit - 1] == "dir", events


@pytest.mark.process_free
@pytest.mark.parametrize("damage, error", [
    (lambda blob: blob.unlink(), "blob"),  # missing: a store error, not a partial result
    (lambda blob: os.truncate(blob, 1000), "truncated"),
])
def test_a_missing_or_truncated_blob_is_a_store_error(tmp_path, damage, error):
    path = tmp_path / "s"
    with Store(path) as store:
        store.stage("e", step_record("a", "p", result=os.urandom(BIG)))
        store.flush()
    damage(blobs.exec_dir(path, "e") / blob_files(path)[0])
    with Store(path) as store, pytest.raises(StoreError, match=error):
        store.get_op("e", "p", "a")


@pytest.mark.process_free
def test_delete_removes_the_blobs_and_acquire_sweeps_orphans(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        store.stage("e", step_record("a", "p", result=os.urandom(BIG)))
        store.flush()
        kept = blob_files(path)
        orphan = blobs.exec_dir(path, "e") / ("0" * 32 + ".blob")  # what a crash before the commit leaves
        orphan.write_bytes(b"partial")
        assert store.sweep_blobs("e") == 1
        assert blob_files(path) == kept  # the referenced one stays
        assert store.get_op("e", "p", "a") is not None
        orphan.write_bytes(b"partial")
        store.acquire("e", lambda: execution_record("e"))
        store.release("e")
        assert blob_files(path) == kept
        assert store.delete_execution("e")
        assert not blobs.exec_dir(path, "e").exists()


@pytest.mark.process_free
def test_a_replaced_large_value_leaves_its_old_blob_to_the_sweep(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        store.stage("e", step_record("a", "p", result=os.urandom(BIG), status="STARTED"))  # replaced below: not terminal
        store.flush()
    with Store(path) as store:  # a later run: its values go to a file of its own
        new = os.urandom(BIG)
        store.stage("e", step_record("a", "p", result=new))
        store.flush()
        assert len(blob_files(path)) == 2
        assert store.sweep_blobs("e") == 1
        assert store.get_op("e", "p", "a").result == new


@pytest.mark.process_free
def test_batches_of_one_run_append_to_one_file_and_only_its_creation_syncs_the_directory(tmp_path, sync_events):
    events = sync_events
    path = tmp_path / "s"
    values = {f"v{i}": os.urandom(BIG + i) for i in range(4)}
    with Store(path) as store:
        for op, value in values.items():
            store.stage("e", step_record(op, "p", result=value))
            store.flush()
    # blobs/ and blobs/<exec>/ made (their parents synced), one file (its directory synced once)
    assert events == ["dir", "dir", "blob", "dir", "blob", "blob", "blob"], events
    assert len(blob_files(path)) == 1
    with Store(path, readonly=True) as store:
        assert {op: store.get_op("e", "p", op).result for op in values} == values


@pytest.mark.process_free
def test_a_full_blob_file_is_followed_by_a_new_one(tmp_path, monkeypatch):
    monkeypatch.setattr(blobs, "FILE_BYTES", 2 * BIG)
    path = tmp_path / "s"
    values = {f"v{i}": os.urandom(BIG) for i in range(5)}
    with Store(path) as store:
        for op, value in values.items():
            store.stage("e", step_record(op, "p", result=value))
            store.flush()
    assert len(blob_files(path)) == 3  # 2 + 2 + 1 values
    with Store(path, readonly=True) as store:
        assert {op: store.get_op("e", "p", op).result for op in values} == values


@pytest.mark.process_free
def test_writeback_of_each_value_starts_before_the_sync(tmp_path, monkeypatch):
    events = []
    real_start, real_fdatasync = blobs.start_writeback, os.fdatasync
    monkeypatch.setattr(blobs, "start_writeback", lambda fd, off, n: (events.append(("start", off, n)),
                                                                        real_start(fd, off, n))[1])
    monkeypatch.setattr(blobs.os, "fdatasync", lambda fd: (events.append(("sync",)), real_fdatasync(fd))[1])
    with Store(tmp_path / "s") as store:
        a, b = step_record("a", "p", result=os.urandom(BIG)), step_record("b", "p", result=os.urandom(BIG))
        store.stage_many("e", "p", [("a", a.dumps()), ("b", b.dumps())])  # one batch
        store.flush()
    size = len(a.dumps())
    assert events == [("start", 0, size), ("start", size, len(b.dumps())), ("sync",)], events


@pytest.mark.process_free
def test_a_blob_file_whose_sync_failed_is_never_written_again(tmp_path, monkeypatch):
    """After a failed fsync the kernel may call the same pages clean: the retry must not trust that file."""
    path = tmp_path / "s"
    real_fdatasync = os.fdatasync
    failures = []

    def flaky(fd):
        if not failures:
            failures.append(fd)
            raise OSError(5, "Input/output error")
        real_fdatasync(fd)

    with Store(path) as store:
        store.stage("e", step_record("a", "p", result=os.urandom(BIG)))
        store.flush()  # the run's file exists and is open
        monkeypatch.setattr(blobs.os, "fdatasync", flaky)
        b = os.urandom(BIG)
        store.stage("e", step_record("b", "p", result=b))
        store.flush()  # the commit is retried after the failure
        monkeypatch.setattr(blobs.os, "fdatasync", real_fdatasync)
        assert failures
        assert store.get_op("e", "p", "b").result == b
    values = raw_values(path)
    assert len(blob_files(path)) == 2
    assert blobs.ref_name(values[b"e\0p\0b"]) != blobs.ref_name(values[b"e\0p\0a"])


@pytest.mark.process_free
def test_a_run_never_appends_to_a_file_that_was_swept(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        store.acquire("e", lambda: execution_record("e"))
        store.stage("e", step_record("a", "p", result=os.urandom(BIG), status="STARTED"))
        store.flush()  # the file stays open for the next batch
        store.stage("e", step_record("a", "p", result=b"small now"))
        store.flush()  # nothing refers to the file any more
        store.release("e")
        store.acquire("e", lambda: execution_record("e"))  # its sweep removes the file
        assert blob_files(path) == []
        b = os.urandom(BIG)
        store.stage("e", step_record("b", "p", result=b))
        store.flush()
        store.release("e")
    with Store(path, readonly=True) as store:
        assert store.get_op("e", "p", "b").result == b


JOB = textwrap.dedent(
    """
    import sys
    import numpy as np
    from durable_mp import durable_execution

    def make(i):
        return np.full(512 * 1024, float(i))  # 4 MiB each

    @durable_execution
    def handler(event, ctx):
        r = ctx.map(list(range(event["n"])), lambda c, x, i, xs: make(x), name="arrays")
        r.throw_if_error()
        return [(float(a[0]), float(a[-1]), a.shape[0]) for a in r.get_results()]

    if __name__ == "__main__":
        print(handler.run({"n": int(sys.argv[2])}, store=sys.argv[1], execution_id="e", max_workers=2), flush=True)
    """
)


def test_a_driver_killed_mid_payload_loses_nothing_committed_and_resumes(tmp_path):
    pytest.importorskip("numpy")
    script, store = tmp_path / "job.py", tmp_path / "store"
    script.write_text(JOB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    n = 64
    proc = subprocess.Popen([sys.executable, str(script), str(store), str(n)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while committed_refs(store) < 2 and time.monotonic() < deadline:  # kill once results are committed
            time.sleep(0.002)
        assert committed_refs(store) >= 2, "no blob reference was committed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
    deadline = time.monotonic() + 10
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    # The workers wrote the arrays themselves: every committed reference is a worker's (with its checksum).
    committed = [v for v in raw_values(store).values() if blobs.is_ref(v)]
    assert committed and all(v.startswith(blob_ref.V2) for v in committed)
    assert all(blob_ref.parse(v).name.startswith(blob_ref.WORKER_PREFIX) for v in committed)
    # Every committed record reads back whole: a reference never names a partial blob.
    with Store(store, readonly=True) as st:
        done = {r.op_id: r for r in st.ops("e") if r.status == "SUCCEEDED" and r.parent_id and r.result}
    assert 0 < len(done) < n, "the kill should land mid-payload"
    assert all(len(r.result) > 4 * 1024 * 1024 for r in done.values())
    # each committed array reads back whole and as written: constant, one distinct index each
    from durable_mp.serdes import unpickle

    firsts = []
    for r in done.values():
        a = unpickle(r.result)
        assert a.shape == (512 * 1024,) and (a == a[0]).all()
        firsts.append(float(a[0]))
    assert len(set(firsts)) == len(firsts) and set(firsts) <= {float(i) for i in range(n)}
    rerun = subprocess.run([sys.executable, str(script), str(store), str(n)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip() == str([(float(i), float(i), 512 * 1024) for i in range(n)])
    refs = sum(1 for v in raw_values(store).values() if blobs.is_ref(v))
    with Store(store) as st:
        assert st.sweep_blobs("e") == 0  # the re-run's acquire already removed the crash's leftovers
    assert refs >= n


@pytest.mark.process_free
def test_gc_removes_the_blobs_of_an_execution_whose_delete_was_interrupted(tmp_path):
    from durable_mp.store.maintenance import collect

    path = tmp_path / "s"
    with Store(path) as store:
        store.acquire("e", lambda: execution_record("e"))
        store.release("e")
        store.acquire("gone", lambda: execution_record("gone"))
        store.release("gone")
        store.stage("e", step_record("a", "p", result=os.urandom(BIG)))
        store.stage("gone", step_record("a", "p", result=os.urandom(BIG)))
        store.flush()
        kept = blob_files(path, "e")
        real_remove_all = blobs.remove_all
        blobs.remove_all = lambda root, exec_id: None  # the driver dies between the two deletes
        try:
            store.delete_execution("gone")
        finally:
            blobs.remove_all = real_remove_all
        assert blob_files(path, "gone")
        collect(store, older_than_s=1e9)  # deletes nothing old; still removes the leftovers
        assert not blobs.exec_dir(path, "gone").exists()
        assert blob_files(path, "e") == kept
        assert store.get_op("e", "p", "a") is not None


WORKER_KILL_JOB = textwrap.dedent(
    """
    import os, signal, sys, threading
    import numpy as np
    from durable_mp import durable_execution

    MARK = sys.argv[2]

    def make(i):
        a = np.full(4 * 1024 * 1024, float(i))  # 32 MiB: the kill lands while it is pickled or sent
        if i == 3 and not os.path.exists(MARK):
            open(MARK, "w").close()
            threading.Timer(0.002, os.kill, (os.getpid(), signal.SIGKILL)).start()
        return a

    @durable_execution
    def handler(event, ctx):
        r = ctx.map(list(range(6)), lambda c, x, i, xs: make(x), name="arrays")
        r.throw_if_error()
        return [(float(a[0]), float(a[-1]), a.shape[0]) for a in r.get_results()]

    if __name__ == "__main__":
        print(handler.run({}, store=sys.argv[1], execution_id="e", max_workers=2), flush=True)
    """
)


def test_a_worker_killed_while_returning_a_large_result_is_rerun_and_no_partial_result_is_stored(tmp_path):
    pytest.importorskip("numpy")
    script, store, mark = tmp_path / "job.py", tmp_path / "store", tmp_path / "killed"
    script.write_text(WORKER_KILL_JOB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    run = subprocess.run([sys.executable, str(script), str(store), str(mark)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert mark.exists()
    n = 4 * 1024 * 1024
    assert run.stdout.strip() == str([(float(i), float(i), n) for i in range(6)])
    with Store(store, readonly=True) as st:
        items = [r for r in st.ops("e") if r.status == "SUCCEEDED" and r.parent_id and r.result]
    assert len(items) == 6 and all(len(r.result) > 8 * n for r in items)


@pytest.mark.process_free
def test_a_large_value_is_committed_at_once_when_no_commit_is_running(tmp_path):
    """The disk is idle: a large value starts its commit now instead of waiting for the batch to be due."""
    with Store(tmp_path / "s", flush_count=10**9, flush_seconds=10**9, clock=lambda: 0.0) as store:
        store.stage("e", step_record("small", "p", result=b"tiny"))
        time.sleep(0.05)  # the committer polls the frozen clock: a small record alone is never due
        assert store.stats["flushes"] == 0
        store.stage("e", step_record("a", "p", result=os.urandom(BIG)))
        assert wait_until(lambda: store.stats["flushes"] == 1), "the large value waited for its batch to be due"
        assert store.flush_due() is None  # the small record went with it
        store.stage("e", step_record("b", "p", result=os.urandom(BIG)))
        assert wait_until(lambda: store.stats["flushes"] == 2)
