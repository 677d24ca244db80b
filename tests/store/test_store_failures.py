"""A store that cannot be written: commits retried, then a latched, resumable stop.

The promise under test (docs/architecture.md "Faults"): a failed checkpoint commit never lets an execution
end SUCCEEDED with records missing.  A commit that fails once is retried and loses
nothing; a store that stays unwritable stops the execution as interrupted (RUNNING, so a
re-run resumes) with ``CheckpointFailedError``, a ``BaseException`` that ``except
Exception`` around ``context.map`` cannot swallow, and that every later write raises again.

Failures are injected in-process by replacing one commit attempt (``GroupCommit._commit``),
and once for real on a full tmpfs.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading

import pytest

import durable_mp.store.commit as commit_mod
from durable_mp import DurableContext, durable_execution
from durable_mp.core.records import BRANCH_KEY_PREFIX, OpStatus
from durable_mp.exceptions import CheckpointFailedError, StoreError
from durable_mp.store.commit import GroupCommit
from durable_mp.store.facade import Store, resolve_store_path
from util import execution_record as execution
from util import step_record as op

pytestmark = pytest.mark.timeout(90)

ITEMS = 50
ITEM_RESULT_BYTES = 20_000  # inline in the record (below the shared-memory threshold), so 50 fill a small disk


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    """Keep the backoff between commit attempts short: these tests exhaust every attempt."""
    monkeypatch.setattr(commit_mod, "COMMIT_RETRY_DELAY_S", 0.001)


def enospc() -> StoreError:
    return StoreError(f"writing the durable_mp store failed: {os.strerror(errno.ENOSPC)}")


def holds_items(batch) -> bool:
    return any(key.startswith(BRANCH_KEY_PREFIX) for group in batch.values() for key in group)


def fail_commits(monkeypatch, *, times: int | None) -> list[int]:
    """Make the first ``times`` commit attempts holding map-item records fail (None: all of them)."""
    original = GroupCommit._commit
    failed = [0]

    def flaky(self, batch):
        if holds_items(batch) and (times is None or failed[0] < times):
            failed[0] += 1
            raise enospc()
        return original(self, batch)

    monkeypatch.setattr(GroupCommit, "_commit", flaky)
    return failed


def item(ctx: DurableContext, x: int, index: int, items: list) -> bytes:
    return bytes([x % 256]) * ITEM_RESULT_BYTES


@durable_execution
def swallowing(event, ctx: DurableContext):
    """A handler that catches every ordinary exception around its map, as user code does."""
    try:
        ctx.map(list(range(ITEMS)), item, name="items")
    except Exception:  # noqa: BLE001 - the point of the test
        pass
    return "done"


@durable_execution
def swallowing_everything(event, ctx: DurableContext):
    """A handler that even catches BaseException: the latch must still keep it from SUCCEEDED."""
    try:
        ctx.map(list(range(ITEMS)), item, name="items")
    except BaseException:  # noqa: BLE001 - the point of the test
        pass
    return "done"


def outcome(path, exec_id: str) -> tuple[str, int]:
    """(execution status, map-item records in the store) as a fresh reader sees them."""
    with Store(path) as st:
        rec = st.get_execution(exec_id)
        items = [r for r in st.ops(exec_id) if r.sub_type == "MapIteration" and r.status == OpStatus.SUCCEEDED]
        return rec.status, len(items)


# -- end to end: a real handler, real workers --------------------------------------------------
def test_a_commit_failing_once_is_retried_and_the_execution_keeps_every_record(store_path, monkeypatch):
    failed = fail_commits(monkeypatch, times=1)
    assert swallowing.run(None, store=store_path, execution_id="once", progress=False) == "done"
    assert failed[0] == 1, "the injected failure must have hit a batch of item records"
    assert outcome(store_path, "once") == ("SUCCEEDED", ITEMS)


@pytest.mark.parametrize("handler", [swallowing, swallowing_everything], ids=["except-Exception", "except-BaseException"])
def test_an_unwritable_store_stops_the_execution_resumably(store_path, monkeypatch, handler):
    failed = fail_commits(monkeypatch, times=None)
    with pytest.raises(CheckpointFailedError) as info:
        handler.run(None, store=store_path, execution_id="stuck", progress=False)
    assert failed[0] == commit_mod.COMMIT_ATTEMPTS, "a failing batch is retried, then the failure latches"
    message = str(info.value)
    assert str(resolve_store_path(store_path)) in message and "unwritable" in message and "re-run" in message
    assert not isinstance(info.value, Exception), "user code catching Exception must not swallow it"
    status, items = outcome(store_path, "stuck")
    assert status == "RUNNING" and items < ITEMS  # interrupted, not FAILED and never SUCCEEDED

    monkeypatch.undo()  # the disk is writable again: re-running the same execution resumes it
    assert handler.run(None, store=store_path, execution_id="stuck", progress=False) == "done"
    assert outcome(store_path, "stuck") == ("SUCCEEDED", ITEMS)
    with Store(store_path) as st:
        rec = st.get_execution("stuck")
        assert rec.runs == 2 and rec.owner_pid == 0


def _mount_tmpfs(where, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    os.makedirs(where)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount of a tmpfs is not permitted here: {done.stderr.strip()}")


def _fill(where, leave_bytes: int) -> str:
    """Fill the file system at ``where`` until ENOSPC, then give ``leave_bytes`` back."""
    filler = os.path.join(where, "filler")
    chunk = b"\0" * 65536
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.truncate(filler, max(0, os.path.getsize(filler) - leave_bytes))
    return filler


def test_a_really_full_disk_stops_the_execution_and_a_rerun_after_freeing_space_resumes(tmp_path):
    fs = tmp_path / "fs"
    _mount_tmpfs(fs, "6m")
    try:
        path = fs / "store"
        with Store(path) as st:  # the store exists, with its execution, before the disk fills
            st.put_execution(execution("seed"))
        filler = _fill(fs, leave_bytes=96 * 1024)  # room for the lock's small write, not for 1 MB of items
        with pytest.raises(CheckpointFailedError) as info:
            swallowing.run(None, store=str(path), execution_id="full", progress=False)
        # LMDB reports a short write on a full disk as EIO, not ENOSPC: the message names the free space
        assert str(path) in str(info.value) and "bytes free" in str(info.value)
        assert isinstance(info.value.__cause__, StoreError)
        status, items = outcome(path, "full")
        assert status == "RUNNING" and items < ITEMS

        os.remove(filler)
        assert swallowing.run(None, store=str(path), execution_id="full", progress=False) == "done"
        assert outcome(path, "full") == ("SUCCEEDED", ITEMS)
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


# -- the store alone ---------------------------------------------------------------------------
@pytest.mark.process_free
def test_a_failing_commit_is_retried_with_the_same_batch(tmp_path, monkeypatch):
    original = GroupCommit._commit
    seen: list[int] = []

    def flaky(self, batch):
        seen.append(sum(map(len, batch.values())))
        if len(seen) < commit_mod.COMMIT_ATTEMPTS:
            raise enospc()
        return original(self, batch)

    monkeypatch.setattr(GroupCommit, "_commit", flaky)
    with Store(tmp_path / "s") as st:
        for i in range(10):
            st.stage("e", op(f"op{i}"))
        assert st.flush() == 10
    assert seen == [10] * commit_mod.COMMIT_ATTEMPTS, "every attempt writes the whole batch: none is dropped"
    with Store(tmp_path / "s") as st:
        assert len(st.ops("e")) == 10


@pytest.mark.process_free
def test_an_exhausted_commit_latches_every_later_write(tmp_path, monkeypatch):
    monkeypatch.setattr(GroupCommit, "_commit", lambda self, batch: (_ for _ in ()).throw(enospc()))
    threads_before = set(threading.enumerate())
    st = Store(tmp_path / "s")
    st.stage("e", op("a"))
    with pytest.raises(CheckpointFailedError) as first:
        st.flush()
    error = first.value
    assert isinstance(error.__cause__, StoreError) and str(st.path) in str(error)
    assert st.get_op("e", "", "a") is not None, "the unwritten batch stays visible: it is never dropped"
    for write in (lambda: st.stage("e", op("b")), lambda: st.stage_many("e", "", [("c", op("c").dumps())]),
                  lambda: st.stage_raw("e", "", "d", op("d").dumps()), st.flush, st.maybe_flush,
                  lambda: st.put_execution(execution("e"))):
        with pytest.raises(CheckpointFailedError) as again:
            write()
        assert again.value is error
    with pytest.raises(CheckpointFailedError):
        st.close()  # the unwritten records are reported, not dropped silently; and it does not hang
    assert not [t for t in set(threading.enumerate()) - threads_before if t.name == "durable_mp-commit"]
    st.close()  # closed now: idempotent
    monkeypatch.undo()
    with Store(tmp_path / "s") as fresh:  # the environment was released; a new Store is not latched
        fresh.stage("e", op("z"))
        fresh.flush()
        assert fresh.get_op("e", "", "z") is not None and fresh.get_op("e", "", "a") is None


@pytest.mark.process_free
def test_a_failing_execution_write_is_retried_then_latched(tmp_path, monkeypatch):
    st = Store(tmp_path / "s")
    calls = [0]
    original = Store._write

    def flaky(self, fn):
        calls[0] += 1
        if calls[0] == 1:
            raise enospc()
        return original(self, fn)

    monkeypatch.setattr(Store, "_write", flaky)
    st.put_execution(execution("e"))  # fails once, retried
    assert st.get_execution("e") is not None and calls[0] == 2
    monkeypatch.setattr(Store, "_write", lambda self, fn: (_ for _ in ()).throw(enospc()))
    with pytest.raises(CheckpointFailedError):
        st.put_execution(execution("e2"))
    with pytest.raises(CheckpointFailedError):
        st.stage("e", op("a"))
    st.release("e")  # best effort once latched: never raises over the error being reported
    monkeypatch.undo()
    with pytest.raises(CheckpointFailedError):
        st.flush()
    with pytest.raises(CheckpointFailedError):
        st.close()
