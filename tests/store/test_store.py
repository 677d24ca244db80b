"""The LMDB store, against a real environment in tmp_path (no mocks).

Processes are real too: a driver killed mid-batch, a live lock owner, a SIGKILLed one.
"""

from __future__ import annotations

import os
import pathlib
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import lmdb
import psutil
import pytest

from durable_mp.exceptions import ExecutionLockedError, StoreError
from durable_mp.core.records import OpStatus, operation_id
from durable_mp.store.facade import (DEFAULT_STORE_DIR, Store, resolve_store_path,
                              validate_exec_id)
from util import REPO, wait_until
from util import execution_record as execution
from util import step_record as op

@pytest.fixture
def path(tmp_path) -> pathlib.Path:
    return tmp_path / "store"


@pytest.fixture
def store(path):
    with Store(path) as st:
        yield st


def spawn(code: str, *args: str) -> subprocess.Popen:
    """A Python subprocess running ``code`` with the repo importable; stdout is a pipe."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(code: str, *args: str) -> str:
    proc = spawn(code, *args)
    out, err = proc.communicate(timeout=50)
    assert proc.returncode == 0, err
    return out


# -- paths and files ---------------------------------------------------------------------------
@pytest.mark.process_free
def test_resolve_store_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DURABLE_MP_STORE", raising=False)
    assert resolve_store_path() == tmp_path / DEFAULT_STORE_DIR
    monkeypatch.setenv("DURABLE_MP_STORE", str(tmp_path / "from-env"))
    assert resolve_store_path() == tmp_path / "from-env"
    assert resolve_store_path("arg") == tmp_path / "arg"
    assert resolve_store_path(tmp_path / "p").is_absolute()


@pytest.mark.process_free
def test_new_store_is_private_even_with_a_permissive_umask(path):
    old = os.umask(0)
    try:
        Store(path).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE(os.stat(path / name).st_mode) == 0o600


@pytest.mark.process_free
def test_writable_by_others_is_refused(path):
    Store(path).close()
    os.chmod(path, 0o770)
    with pytest.raises(StoreError, match="writable by group/others") as info:
        Store(path)
    assert f"chmod go-w {path}" in str(info.value) and "arbitrary code" in str(info.value)
    with pytest.raises(StoreError, match="writable by group/others"):
        Store(path, readonly=True)  # inspecting loads pickles too
    os.chmod(path, 0o700)
    os.chmod(path / "data.mdb", 0o666)
    with pytest.raises(StoreError, match="data.mdb is writable by group/others"):
        Store(path)
    os.chmod(path / "data.mdb", 0o600)
    Store(path).close()


@pytest.mark.process_free
@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_owned_by_another_user_is_refused(path):
    Store(path).close()
    os.chown(path, 54321, 54321)
    with pytest.raises(StoreError, match="owned by uid 54321"):
        Store(path)
    os.chown(path, 0, 0)
    os.chown(path / "data.mdb", 54321, 54321)
    with pytest.raises(StoreError, match="owned by uid 54321"):
        Store(path)


def _assert_clean(error: StoreError) -> None:
    """One line, and no lmdb traceback chained to it."""
    assert "\n" not in str(error)
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


@pytest.mark.process_free
def test_garbage_data_file_is_a_store_error(path):
    path.mkdir(mode=0o700)
    (path / "data.mdb").write_bytes(os.urandom(1 << 16))
    with pytest.raises(StoreError, match="not a valid LMDB store") as info:
        Store(path)
    _assert_clean(info.value)


@pytest.mark.process_free
def test_truncated_data_file_is_a_store_error(path):
    with Store(path) as st:
        for i in range(500):
            st.stage("e", op(f"op{i}", result=b"x" * 500))
    os.truncate(path / "data.mdb", os.path.getsize(path / "data.mdb") // 2)
    for readonly in (True, False):
        with pytest.raises(StoreError, match="not a valid LMDB store") as info:
            Store(path, readonly=readonly)
        _assert_clean(info.value)


@pytest.mark.process_free
def test_regular_file_is_a_store_error(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("hello")
    with pytest.raises(StoreError, match="not a directory") as info:
        Store(target)
    _assert_clean(info.value)


@pytest.mark.process_free
def test_foreign_lmdb_environment_is_refused(path):
    path.mkdir(mode=0o700)
    with lmdb.open(str(path), mode=0o700) as env, env.begin(write=True) as txn:
        txn.put(b"someone", b"else's data")
    with pytest.raises(StoreError, match="another program") as info:
        Store(path)
    _assert_clean(info.value)


@pytest.mark.process_free
def test_foreign_meta_database_without_marker_is_refused(path):
    path.mkdir(mode=0o700)
    with lmdb.open(str(path), mode=0o700, max_dbs=2) as env:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"format", b"other-program/7", db=meta)
    with pytest.raises(StoreError, match="format marker"):
        Store(path)


@pytest.mark.process_free
def test_missing_store_without_create(path):
    with pytest.raises(StoreError, match="no durable_mp store"):
        Store(path, create=False)
    with pytest.raises(StoreError, match="no durable_mp store"):
        Store(path, readonly=True)
    assert not path.exists()
    path.mkdir(mode=0o700)
    with pytest.raises(StoreError, match="no durable_mp store"):
        Store(path, create=False)


# -- executions --------------------------------------------------------------------------------
@pytest.mark.process_free
def test_execution_round_trip(store):
    assert store.get_execution("nope") is None
    rec = execution("e1", error={"ErrorType": "X"}, extra={"k": [1, 2]})
    store.put_execution(rec)
    assert store.get_execution("e1") == rec
    store.put_execution(execution("e0", created_ts=rec.created_ts - 10))
    assert [r.exec_id for r in store.list_executions()] == ["e0", "e1"]
    done = rec._replace(status="SUCCEEDED", result=b"42", ended_ts=time.time())
    store.put_execution(done)
    assert store.get_execution("e1") == done


@pytest.mark.process_free
@pytest.mark.parametrize("bad", ["", "x" * 201, "a\0b", "tab\there", "new\nline", "\x7f", "é" * 101, None, b"id"])
def test_bad_execution_ids_are_rejected(store, bad):
    with pytest.raises(ValueError, match="execution id"):
        store.get_execution(bad)
    with pytest.raises(ValueError, match="execution id"):
        store.stage(bad, op("a"))


@pytest.mark.process_free
def test_good_execution_ids():
    for good in ("x" * 200, "nightly-2026-11-26", "ünïcødé job", "a/b:c"):
        assert validate_exec_id(good) == good


# -- operations --------------------------------------------------------------------------------
@pytest.mark.process_free
def test_op_round_trip_survives_reopen(path):
    a = op(operation_id(None, 1), attempts=((1, 1.0, 2.0, 123, None),), extra={"n": 3})
    b = op(operation_id(a.op_id, 0), parent_id=a.op_id, result="json text")
    with Store(path) as st:
        st.stage("e", a)
        st.stage_raw("e", b.parent_id, b.op_id, b.dumps())
        assert st.flush() == 2
        assert st.flush() == 0
    with Store(path) as st:
        assert st.get_op("e", "", a.op_id) == a
        assert st.get_op("e", a.op_id, b.op_id) == b
        assert st.get_op("e", "", b.op_id) is None
        assert st.children("e", a.op_id) == [b]


@pytest.mark.process_free
def test_prefixes_isolate_executions_and_parents(store):
    # "job" is a prefix of "job2" and parent "ab" of parent "abc": neither may leak.
    for exec_id in ("job", "job2"):
        store.stage(exec_id, op("ab", result=exec_id))
        store.stage(exec_id, op("abc", result=exec_id))
        store.stage(exec_id, op("kid-of-ab", parent_id="ab", result=exec_id))
        store.stage(exec_id, op("kid-of-abc", parent_id="abc", result=exec_id))
    for flushed in (False, True):
        if flushed:
            store.flush()
        assert {r.op_id for r in store.children("job", "")} == {"ab", "abc"}
        assert [r.op_id for r in store.children("job", "ab")] == ["kid-of-ab"]
        assert [r.op_id for r in store.children("job", "a")] == []
        assert set(store.subtree("job", "ab")) == {"kid-of-ab"}
        assert {r.result for r in store.ops("job")} == {"job"}
        assert len(store.ops("job")) == 4
        assert store.ops("jo") == []
        assert store.get_op("job2", "ab", "kid-of-ab").result == "job2"
        assert store.parents_with_children("job") == {"", "ab", "abc"}


@pytest.mark.process_free
def test_staged_records_are_visible_before_flush_and_overwrite(store):
    store.stage("e", op("s", status=OpStatus.STARTED, result=None))
    assert store.get_op("e", "", "s").status == OpStatus.STARTED
    store.stage("e", op("s", status=OpStatus.PENDING, result=None))  # same key: replaces, not a 2nd record
    assert store.flush_due() is not None
    assert [r.status for r in store.children("e", "")] == [OpStatus.PENDING]
    assert store.flush() == 1
    # a staged record shadows its committed version everywhere until flushed
    store.stage("e", op("s", status=OpStatus.FAILED))
    store.stage("e", op("t", parent_id="s"))
    assert store.get_op("e", "", "s").status == OpStatus.FAILED
    assert [r.status for r in store.children("e", "")] == [OpStatus.FAILED]
    assert [r.status for r in store.ops("e") if r.op_id == "s"] == [OpStatus.FAILED]
    assert set(store.subtree("e", "s")) == {"t"}
    assert store.flush() == 2
    assert store.flush_due() is None


@pytest.mark.process_free
def test_subtree_is_recursive_across_committed_and_staged(store):
    root = operation_id(None, 1)
    branches = [operation_id(root, i) for i in range(3)]
    for b in branches:
        store.stage("e", op(b, parent_id=root))
    store.stage("e", op(root))
    store.flush()
    steps = {b: operation_id(b, 1) for b in branches}
    for b, s in steps.items():
        store.stage("e", op(s, parent_id=b))
    deep = operation_id(steps[branches[0]], 1)
    store.stage("e", op(deep, parent_id=steps[branches[0]]))
    tree = store.subtree("e", root)
    assert set(tree) == set(branches) | set(steps.values()) | {deep}
    assert root not in tree
    assert set(store.subtree("e", branches[0])) == {steps[branches[0]], deep}
    assert store.subtree("e", deep) == {}
    store.flush()
    assert store.subtree("e", root) == tree


@pytest.mark.process_free
def test_flush_policy_by_count_and_by_time(path):
    now = [100.0]
    with Store(path, flush_count=3, flush_seconds=0.5, clock=lambda: now[0]) as st:
        assert st.flush_due() is None
        st.stage("e", op("a"))
        assert st.flush_due() == 0.5
        now[0] += 0.2
        assert st.flush_due() == pytest.approx(0.3)
        st.maybe_flush()
        time.sleep(0.1)  # the committer polls the (injected) clock: not due yet, nothing committed
        assert st.stats["flushes"] == 0
        st.stage("e", op("a"))  # overwrite: still one record
        st.stage("e", op("b"))
        assert st.stats["flushes"] == 0
        st.stage("e", op("c"))  # third distinct record: due by count, handed to the committer
        assert wait_until(lambda: st.stats["flushes"] == 1, 10.0), "the committer thread did not commit in time"
        assert st.stats["records_written"] == 3
        st.stage("e", op("d"))
        now[0] += 0.5  # due by age: the committer notices on its own, no call needed
        assert wait_until(lambda: st.stats["flushes"] == 2, 10.0), "the committer thread did not commit in time"
        assert st.flush_due() is None
        assert st.get_op("e", "", "d") is not None


@pytest.mark.process_free
def test_reads_see_records_while_they_are_being_committed(path):
    with Store(path, flush_count=1000) as st:
        for i in range(5000):
            st.stage("e", op(f"r{i}"))
            if i % 997 == 0:
                assert st.get_op("e", "", f"r{i}") is not None
                assert len(st.children("e", "")) == i + 1
        st.flush()
        assert st.flush_due() is None and len(st.children("e", "")) == 5000
        assert st.stats["records_written"] == 5000


@pytest.mark.process_free
def test_close_flushes_and_closed_store_refuses(path):
    st = Store(path)
    st.stage("e", op("a"))
    st.close()
    st.close()
    with pytest.raises(StoreError, match="closed"):
        st.get_op("e", "", "a")
    with Store(path) as again:
        assert again.get_op("e", "", "a") is not None


@pytest.mark.process_free
def test_stores_on_one_path_share_the_environment(path):
    with Store(path) as a, Store(str(path)) as b, Store(path, readonly=True) as ro:
        a.stage("e", op("x"))
        a.flush()
        assert b.get_op("e", "", "x") is not None
        assert ro.get_op("e", "", "x") is not None
    with Store(path) as c:  # everything was released
        assert c.get_op("e", "", "x") is not None


@pytest.mark.timeout(60)
def test_killed_driver_leaves_exactly_the_flushed_records(path):
    Store(path).close()
    run("""
        import os, sys
        from durable_mp.store.facade import Store
        from durable_mp.core.records import OpRecord
        st = Store(sys.argv[1], flush_count=10**9, flush_seconds=10**9)
        rec = lambda i: OpRecord(f"op{i}", "", "STEP", "Step", None, "SUCCEEDED", 1.0, result=b"x" * 100)
        for i in range(1000):
            st.stage("e", rec(i))
        st.flush()
        for i in range(1000, 1500):
            st.stage("e", rec(i))
        os._exit(0)  # no flush, no close
    """, str(path))
    with Store(path) as st:
        assert sorted(r.op_id for r in st.ops("e")) == sorted(f"op{i}" for i in range(1000))


@pytest.mark.timeout(60)
def test_sigkill_during_flushes_leaves_whole_batches(path):
    Store(path).close()
    proc = spawn("""
        import sys
        from durable_mp.store.facade import Store
        from durable_mp.core.records import OpRecord
        st = Store(sys.argv[1], flush_count=10**9, flush_seconds=10**9)
        batch = 0
        while True:
            for i in range(500):
                st.stage("e", OpRecord(f"b{batch}-{i}", "", "STEP", "Step", None, "SUCCEEDED", 1.0))
            st.flush()
            batch += 1
            if batch == 3:
                print("ready", flush=True)
    """, str(path))
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    with Store(path) as st:
        ids = [r.op_id for r in st.ops("e")]
    batches = {}
    for i in ids:
        batches.setdefault(i.split("-")[0], set()).add(i)
    assert len(batches) >= 3
    assert all(len(members) == 500 for members in batches.values())


# -- growth and space --------------------------------------------------------------------------
@pytest.mark.process_free
def test_map_grows_when_full(path):
    with Store(path, map_size=64 * 1024) as st:
        for batch in range(20):
            for i in range(50):
                st.stage("e", op(f"{batch}-{i}", result=os.urandom(4096)))
            st.flush()
        st.put_execution(execution("e", input=os.urandom(2 << 20)))  # one 2 MiB value
        assert st.stats["map_grows"] >= 5
        assert len(st.ops("e")) == 1000
    with Store(path, map_size=64 * 1024) as st:  # reopening keeps the grown map
        assert len(st.get_execution("e").input) == 2 << 20
        st.stage("e", op("more", result=os.urandom(1 << 20)))
        st.flush()
        assert st.stats["map_grows"] == 0


@pytest.mark.timeout(60)
def test_reader_follows_a_map_grown_by_another_process(path):
    with Store(path, map_size=64 * 1024) as st:
        st.stage("e", op("first"))
        st.flush()
    with Store(path, readonly=True) as reader:
        assert reader.get_op("e", "", "first") is not None
        run("""
            import os, sys
            from durable_mp.store.facade import Store
            from durable_mp.core.records import OpRecord
            with Store(sys.argv[1], map_size=64 * 1024) as st:
                for i in range(400):
                    st.stage("e", OpRecord(f"op{i}", "", "STEP", "Step", None, "SUCCEEDED", 1.0,
                                           result=os.urandom(8192)))
                    st.maybe_flush()
                st.flush()
                assert st.stats["map_grows"] > 0
        """, str(path))
        assert len(reader.ops("e")) == 401


@pytest.mark.process_free
def test_delete_execution_removes_its_records_and_reuses_space(path):
    with Store(path) as st:
        for exec_id in ("job", "job2"):
            st.put_execution(execution(exec_id))
            for i in range(300):
                st.stage(exec_id, op(f"op{i}", parent_id="p" if i % 2 else "", result=os.urandom(2000)))
        st.flush()
        st.stage("job", op("staged-only"))
        assert st.delete_execution("job") is True
        assert st.get_execution("job") is None
        assert st.ops("job") == [] and st.children("job", "p") == []
        assert st.get_op("job", "", "staged-only") is None
        assert len(st.ops("job2")) == 300 and st.get_execution("job2") is not None
        assert st.delete_execution("job") is False
        size = os.path.getsize(path / "data.mdb")
        for round_ in range(3):  # the freed pages are reused, the file does not keep growing
            for i in range(300):
                st.stage(f"new{round_}", op(f"op{i}", result=os.urandom(2000)))
            st.flush()
            assert st.delete_execution(f"new{round_}")
        assert os.path.getsize(path / "data.mdb") < size * 1.5


# -- read-only ---------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_readonly_reads_while_a_writer_holds_the_write_lock(path):
    with Store(path) as st:
        st.put_execution(execution("e"))
        st.stage("e", op("a"))
    holder = spawn("""
        import sys, time, lmdb
        env = lmdb.open(sys.argv[1], max_dbs=8)
        txn = env.begin(write=True)  # hold LMDB's writer lock
        print("holding", flush=True)
        time.sleep(60)
    """, str(path))
    try:
        assert holder.stdout.readline().strip() == "holding"
        with Store(path, readonly=True) as ro:
            assert ro.get_execution("e").exec_id == "e"
            assert [r.op_id for r in ro.children("e", "")] == ["a"]
            with pytest.raises(StoreError, match="read-only"):
                ro.stage("e", op("b"))
            with pytest.raises(StoreError, match="read-only"):
                ro.put_execution(execution("x"))
            with pytest.raises(StoreError, match="read-only"):
                ro.acquire("e", lambda: execution("e"))
    finally:
        holder.kill()
        holder.communicate(timeout=30)


@pytest.mark.process_free
def test_readonly_then_writable_in_one_process_is_refused(path):
    Store(path).close()
    with Store(path, readonly=True):
        with pytest.raises(StoreError, match="already open read-only"):
            Store(path)


# -- locking -----------------------------------------------------------------------------------
@pytest.mark.process_free
def test_acquire_creates_then_retakes_own_lock(store):
    rec, created = store.acquire("e", lambda: execution("e"))
    me = psutil.Process()
    assert created and rec.owner_pid == me.pid and rec.owner_create_time == pytest.approx(me.create_time())
    assert store.get_execution("e") == rec
    with pytest.raises(ExecutionLockedError, match="thread"):  # held: not re-entrant, not even in one thread
        store.acquire("e", lambda: pytest.fail("must not create twice"))
    store.release("e")
    released = store.get_execution("e")
    assert released.owner_pid == 0 and released.status == "RUNNING"
    again, created = store.acquire("e", lambda: pytest.fail("must not create twice"))
    assert not created and again.owner_pid == me.pid and again.runs == 2
    store.release("e")
    store.release("missing")  # no-op


@pytest.mark.process_free
def test_a_second_thread_of_the_same_process_is_refused(store):
    held, finish = threading.Event(), threading.Event()

    def owner() -> None:
        store.acquire("e", lambda: execution("e"))
        held.set()
        finish.wait(30)
        store.release("e")

    thread = threading.Thread(target=owner)
    thread.start()
    try:
        assert held.wait(30)
        with pytest.raises(ExecutionLockedError) as info:
            store.acquire("e", lambda: execution("e"))
        assert "thread" in str(info.value) and "'e'" in str(info.value)
        store.release("e")  # not this thread's: the owner thread keeps its lock
        with Store(store.path) as other, pytest.raises(ExecutionLockedError):
            other.acquire("e", lambda: execution("e"))  # another Store on the same path shares the lock
    finally:
        finish.set()
        thread.join(30)
    rec, created = store.acquire("e", lambda: execution("e"))  # released by its owner: free again
    assert not created and rec.runs == 2
    store.release("e")


@pytest.mark.process_free
def test_the_lock_of_a_thread_that_ended_without_releasing_is_taken_over(store):
    thread = threading.Thread(target=lambda: store.acquire("e", lambda: execution("e")))
    thread.start()
    thread.join(30)
    rec, created = store.acquire("e", lambda: pytest.fail("must not create twice"))
    assert not created and rec.owner_pid == os.getpid() and rec.runs == 2
    store.release("e")


@pytest.mark.process_free
@pytest.mark.timeout(60)
def test_two_threads_never_run_one_execution_at_once(store_path):
    from durable_mp import durable_execution

    inside, leave = threading.Event(), threading.Event()

    @durable_execution
    def handler(event, ctx):
        inside.set()
        assert leave.wait(30)
        return "first"

    results: list = []
    first = threading.Thread(target=lambda: results.append(handler.run(None, store=store_path, execution_id="one")))
    first.start()
    try:
        assert inside.wait(30)
        with pytest.raises(ExecutionLockedError):
            handler.run(None, store=store_path, execution_id="one")
    finally:
        leave.set()
        first.join(30)
    assert results == ["first"]


@pytest.mark.process_free
def test_acquire_finished_execution_does_not_start_a_run(store):
    store.put_execution(execution("done", status="SUCCEEDED", result=b"1", owner_pid=os.getppid(),
                                  owner_create_time=psutil.Process(os.getppid()).create_time()))
    rec, created = store.acquire("done", lambda: execution("done"))
    assert not created and rec.status == "SUCCEEDED" and rec.runs == 1 and rec.owner_pid == os.getpid()


@pytest.mark.process_free
def test_recycled_pid_is_not_a_live_owner(store):
    parent = psutil.Process(os.getppid())  # alive, but started at another time than recorded
    store.put_execution(execution("e", owner_pid=parent.pid, owner_create_time=parent.create_time() - 100))
    rec, _ = store.acquire("e", lambda: execution("e"))
    assert rec.owner_pid == os.getpid() and rec.runs == 2


def test_the_lock_names_the_host_and_a_lease_the_owner_renews(store, monkeypatch):
    import socket

    from durable_mp.store import records

    monkeypatch.setattr(records, "LEASE_SECONDS", 0.6)
    rec, _ = store.acquire("e", lambda: execution("e"))
    assert rec.owner_host == socket.gethostname() and rec.lease_until > time.time()
    first = rec.lease_until
    time.sleep(1.5)
    renewed = store.get_execution("e").lease_until
    assert renewed > first and renewed > time.time(), "the owner renews its lease while it holds the lock"
    store.release("e")
    released = store.get_execution("e")
    assert released.owner_host == "" and released.lease_until == 0.0


def test_a_lock_held_by_another_host_is_taken_over_only_after_its_lease(store):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(30)  # a pid that no process here has: on the owner's host it may well be alive
    other = execution("e", owner_pid=gone.pid, owner_create_time=time.time() - 5)._replace(
        owner_host="another-host", lease_until=time.time() + 60)
    store.put_execution(other)
    with pytest.raises(ExecutionLockedError) as info:
        store.acquire("e", lambda: pytest.fail("exists"))
    assert "another-host" in str(info.value) and "lease" in str(info.value)
    assert store.get_execution("e").owner_host == "another-host"
    store.put_execution(other._replace(lease_until=time.time() - 1))  # its owner stopped renewing it
    rec, created = store.acquire("e", lambda: pytest.fail("exists"))
    assert not created and rec.owner_pid == os.getpid() and rec.owner_host != "another-host" and rec.runs == 2
    store.release("e")


LOCK_HOLDER = """
    import sys, time
    from durable_mp.store.facade import Store, ExecutionRecord
    st = Store(sys.argv[1])
    now = time.time()
    st.acquire("e", lambda: ExecutionRecord("e", "RUNNING", "m:f", None, None, None, now, now, None, 0, 0.0, 1))
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_live_owner_blocks_and_dead_owner_is_taken_over(path):
    Store(path).close()
    holder = spawn(LOCK_HOLDER, str(path))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with Store(path) as st:
            with pytest.raises(ExecutionLockedError) as info:
                st.acquire("e", lambda: execution("e"))
            assert f"pid {holder.pid}" in str(info.value) and "'e'" in str(info.value)
            assert "since" in str(info.value)
            st.release("e")  # not ours: a live owner's lock stays
            assert st.get_execution("e").owner_pid == holder.pid
            holder.send_signal(signal.SIGKILL)
            holder.communicate(timeout=30)
            rec, created = st.acquire("e", lambda: execution("e"))
            assert not created and rec.owner_pid == os.getpid() and rec.runs == 2
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate(timeout=30)


# -- fork --------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_store_is_unusable_in_a_forked_child(store):
    store.stage("e", op("a"))
    store.flush()
    pid = os.fork()
    if pid == 0:  # child: every use must raise StoreError, and nothing else may happen
        code = 1
        try:
            store.get_op("e", "", "b")
        except StoreError as exc:
            code = 0 if "fork" in str(exc) else 2
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get_op("e", "", "a") is not None  # the parent is unaffected
