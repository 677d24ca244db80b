"""The checkpoint store: executions and operation records in one LMDB environment.

::

    driver process                                       LMDB environment (.durable_mp/)
    ┌──────────────────────────────────────────┐         ┌─────────────────────────────┐
    │ stage(rec) ─▶ staged overlay ─ flush() ──┼─ 1 txn ▶│ ops: exec\\0parent\\0op → rec │
    │   (dict, visible to get_op/children)     │         │ executions: exec → record    │
    │ acquire/put_execution/release ───────────┼─ 1 txn ▶│ meta: format marker          │
    └──────────────────────────────────────────┘         └─────────────────────────────┘

* **Group commit.**  Only the driver writes.  Operation records are staged in memory and
  committed together, one durable (fsync'ed) transaction per batch, by the store's
  ``GroupCommit`` (``store/commit.py``): a batch is due after ``flush_count`` records or
  ``flush_seconds`` after its oldest record, and its committer thread notices that itself.
  Reads see staged records, so replay never waits for a commit.  A killed driver loses
  only the records not yet committed; a commit is atomic.
* **An unwritable store stops the run.**  Failed commits and execution writes are retried;
  if the store stays unwritable, every later write raises one latched
  ``CheckpointFailedError`` (a ``BaseException``), so the execution ends interrupted and
  resumable, never SUCCEEDED with records missing.
* **Keys** are ``exec_id \\0 parent_id \\0 op_id`` (UTF-8), so the children of one
  operation are one prefix scan and no execution or parent can see another's records
  (ids never contain NUL).
* **Executions** commit immediately.  ``acquire`` takes an execution's lock in one write
  transaction; the owner is a (pid, process start time) pair, so a recycled pid is not
  mistaken for a live owner, and a dead owner's lock is simply taken over.  Within the
  process, one thread at a time holds it (``records.HOLDERS``).
* The map grows by doubling when a transaction finds it full.
* **Large values** (``blobs.BLOB_BYTES`` and up, a numpy result) are appended by the
  committer to the execution's blob file, synced, and only then committed as a reference
  (``store/blobs.py``); reads resolve references transparently.

Opening, permission checks and the per-process sharing of an environment live in
``env``; execution records, id rules and the lock policy in ``records``; taking,
renewing and releasing an execution's lock in ``ownership``; reading and writing
execution records in ``executions``; one operation's record in ``single_op``, many in
``op_reads``.

A ``Store`` belongs to the process that opened it: never use it in a forked child (it
raises ``StoreError`` there).  ``make_new`` passed to ``acquire`` runs inside the write
transaction and must not use the store.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import Any, Callable, Iterable, TypeVar


from durable_mp.core.records import OpRecord
from durable_mp.exceptions import StoreError
from durable_mp.store import blobs
from durable_mp.store.commit import GroupCommit, Items, with_retries
from durable_mp.store.forward import backwards, refusal
from durable_mp.store.executions import Executions
from durable_mp.store.op_reads import OpReads, scan
from durable_mp.store.single_op import SingleOp
from durable_mp.store.ownership import Ownership
from durable_mp.store.txn import Transactions
from durable_mp.store.env import (DEFAULT_STORE_DIR, STORE_ENV_VAR, SharedEnv, open_shared, release_shared,
                                  resolve_store_path)
from durable_mp.store.records import (FAILED, RUNNING, SEP, SUCCEEDED, ExecutionRecord, check_id, validate_exec_id)

log = logging.getLogger("durable_mp.store")

__all__ = ["DEFAULT_STORE_DIR", "STORE_ENV_VAR", "DEFAULT_MAP_SIZE", "FLUSH_COUNT", "FLUSH_SECONDS",
           "ExecutionRecord", "Store", "resolve_store_path", "validate_exec_id",
           "RUNNING", "SUCCEEDED", "FAILED"]

DEFAULT_MAP_SIZE = 1 << 30  # bytes; only address space until used, doubled whenever full
FLUSH_COUNT = 5000  # staged records that make a batch due
FLUSH_SECONDS = 0.02  # seconds after its oldest record that a batch is due

T = TypeVar("T")
Txn = Any  # an lmdb.Transaction (py-lmdb ships no type information)


class Store:
    """Executions and operation checkpoints of durable_mp, in an LMDB directory."""

    # ``stage_many(exec_id, parent_id, [(op_key, data), ...])``: stage several pickled records
    # of one parent under one lock.  The checkpoint hot path (one call per worker message), so
    # it is ``GroupCommit.stage_many`` itself, bound in ``__init__`` without a wrapper.
    stage_many: Callable[[str, str, Iterable[tuple[str, Any]]], None]
    # ``stage_items(exec_id, parent_id, indices, records)``: batch items' records under their
    # ``branch_key``s (``GroupCommit.stage_items``, bound the same way).
    stage_items: Callable[[str, str, list[int], list[Any]], None]

    def __init__(self, path: str | os.PathLike[str] | None = None, *, map_size: int = DEFAULT_MAP_SIZE,
                 readonly: bool = False, create: bool = True, flush_count: int = FLUSH_COUNT,
                 flush_seconds: float = FLUSH_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        if flush_count < 1 or flush_seconds < 0 or map_size < 1:
            raise ValueError("flush_count and map_size must be >= 1 and flush_seconds >= 0")
        self.path: pathlib.Path = resolve_store_path(path)
        self.readonly = readonly
        self._valid_execs: set[str] = set()
        self._closing = False
        self._stats = {"commits": 0, "map_grows": 0, "reopened": 0}
        self._group = GroupCommit(self._put_items, self._check_group, where=str(self.path), flush_count=flush_count,
                                  flush_seconds=flush_seconds, clock=clock)
        self._lock = self._group.lock  # reads of the overlay and of LMDB together see one state
        self.stage_many = self._group.stage_many
        self.stage_items = self._group.stage_items
        self._blobs = blobs.BlobWriter(self.path)  # used by the committer thread only
        shared = open_shared(self.path, map_size=map_size, readonly=readonly, create=create)
        self._txn = Transactions(self.path, readonly, self._stats, shared)
        self._env_id = shared.key  # names this environment in the per-thread lock registry
        self._ownership = Ownership(self)  # the locks and leases of the executions this store holds
        self._reads = OpReads(self)  # reads of a batch's items and of subtrees
        self._single = SingleOp(self)  # one record: read, its version, compare-and-set
        self._executions = Executions(self)  # the execution records

    def __repr__(self) -> str:
        mode = "read-only" if self.readonly else "read-write"
        return f"<Store {str(self.path)!r} {mode}{' closed' if self._shared is None else ''}>"

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def stats(self) -> dict[str, int]:
        """Counters: write transactions, map growths, and the group commit's flushes and records."""
        return {**self._stats, **self._group.stats}

    def close(self) -> None:
        """Commit staged records and release the environment.  Idempotent.

        On an unwritable store it still releases everything (it never hangs), then raises
        the latched ``CheckpointFailedError``: records that could not be written are
        reported, never dropped silently.
        """
        with self._lock:
            shared = self._shared
            if shared is None or self._closing:
                return
            self._closing = True  # a concurrent close must not release the environment twice
        self._ownership.stop_leases()
        try:
            if not shared.forked and not shared.closed:
                self._group.flush()
        finally:
            try:
                self._group.close()  # joins the committer: never under the lock it needs to finish
            finally:
                self._blobs.close()
                with self._lock:
                    self._txn.shared = None
                release_shared(shared)

    # -- staging and group commit (GroupCommit does the work) ------------------------------
    def stage(self, exec_id: str, rec: OpRecord) -> None:
        """Queue a record for the next commit; it is visible to reads at once."""
        self._group.stage_many(exec_id, rec.parent_id, ((rec.op_id, rec.dumps()),))

    def stage_raw(self, exec_id: str, parent_id: str, op_id: str, data: bytes) -> None:
        """Like ``stage`` for a record a worker already pickled (``rec.dumps()``).

        ``op_id`` is the last key component: an operation id, or a batch item's
        ``records.branch_key(index)``.
        """
        self._group.stage_many(exec_id, parent_id, ((op_id, data),))

    def flush(self) -> int:
        """Make every staged record durable before returning; return how many were staged.

        Raises ``CheckpointFailedError`` once the store has turned out unwritable.
        """
        return self._group.flush()

    def maybe_flush(self) -> None:
        """Start committing the staged batch if it is due (does not wait for the commit)."""
        self._group.maybe_flush()

    def flush_due(self) -> float | None:
        """Seconds until the staged batch is due (0 = now); None if nothing is staged."""
        return self._group.flush_due()

    def _check_group(self, exec_id: str, parent_id: str) -> None:
        """May records be staged under this parent?  (Once per group and batch.)"""
        self._writable()
        self._prefix(exec_id, parent_id)

    def _put_items(self, items: Items) -> None:
        """A batch of the group commit, in one durable write transaction.

        Large values go to a blob file first (synced before the transaction commits).  A
        record that would move a committed one backwards (``forward``) is left out, and the
        refusal latched (``GroupCommit.refuse``): found in the same transaction that writes,
        so no other writer (a callback's sender) can slip in between.
        """
        spilled = self._blobs.spill(items)
        refused: dict[bytes, str] = {}  # full key -> how it would have moved backwards

        def put(txn: Txn, sh: SharedEnv) -> None:
            cur = txn.cursor(db=sh.ops)
            found = cur.getmulti([key for key, _ in items])  # fresh keys (most of a map's) cost one probe each
            refused.clear()
            if found:
                new = dict(items)
                for key, old in found:
                    if old[:1] == b"\0" and blobs.is_ref(old):
                        old = blobs.load(self.path, old, key.decode(errors="replace"))
                    how = backwards(old, new[key])
                    if how is not None:
                        refused[key] = how
            cur.putmulti([item for item in spilled if item[0] not in refused] if refused else spilled)

        self._write(put)
        if refused:
            key, how = next(iter(refused.items()))
            self._group.refuse(refusal(key.replace(b"\0", b"/").decode(errors="replace"), how))

    def reopen(self, exec_id: str, entries: list[tuple[str, str, bytes]]) -> None:
        """Rewrite records ``(parent_id, key, data)`` durably, backwards if need be: fix-and-resume.

        The one way a record moves back (``core.reopen`` decides what it becomes); it is written
        at once, past the staged overlay, and counted in ``stats["reopened"]``.
        """
        for parent_id, key, _ in entries:
            self._prefix(exec_id, parent_id)
            check_id("op_id", key)
        rows = sorted((f"{exec_id}{SEP}{parent}{SEP}{key}".encode(), data) for parent, key, data in entries)
        with self._lock:
            self._group.flush()  # the committer is idle now, and stays so while we hold the lock
            rows = self._blobs.spill(rows)
            self._write_or_latch(lambda txn, sh: txn.cursor(db=sh.ops).putmulti(rows),
                                 f"reopening checkpoints of {exec_id!r}")
            self._stats["reopened"] += len(rows)

    # -- transactions (``Transactions``; failed writes retried and latched here) ------------
    @property
    def _shared(self) -> SharedEnv | None:
        return self._txn.shared

    def _env(self) -> SharedEnv:
        return self._txn.env()

    def _writable(self) -> SharedEnv:
        return self._txn.writable()

    def _write_or_latch(self, fn: Callable[[Txn, SharedEnv], T], what: str) -> T:
        """``_write``, retried; if the store stays unwritable, latch that (``CheckpointFailedError``)."""
        self._group.raise_if_failed()
        self._writable()  # a closed or read-only store is a usage error, not an unwritable disk
        try:
            return with_retries(lambda: self._write(fn))
        except Exception as exc:  # noqa: BLE001 - every attempt failed
            raise self._group.latch(exc, what) from exc

    def _read(self, fn: Callable[[Txn, SharedEnv], T]) -> T:
        return self._txn.read(fn)

    def _write(self, fn: Callable[[Txn, SharedEnv], T]) -> T:
        """Run ``fn(txn, shared)`` in one write transaction, growing the map until it fits."""
        return self._txn.write(fn)

    def _load(self, data: bytes, where: str) -> OpRecord:
        if data[:1] == b"\0" and blobs.is_ref(data):  # a large value, committed to a blob file
            data = blobs.load(self.path, data, where)
        try:
            return OpRecord.loads(data)
        except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged record
            raise StoreError(f"checkpoint {where} in {self.path} cannot be decoded: {exc!r}") from exc

    def _exec_key(self, exec_id: str) -> bytes:
        if exec_id not in self._valid_execs:
            validate_exec_id(exec_id)
            self._valid_execs.add(exec_id)
        return exec_id.encode()

    def _prefix(self, exec_id: str, parent_id: str) -> bytes:
        self._exec_key(exec_id)
        check_id("parent_id", parent_id)
        return f"{exec_id}{SEP}{parent_id}{SEP}".encode()

    # -- executions (``Executions``; deleting one and sweeping its blobs stay here) ---------
    def get_execution(self, exec_id: str) -> ExecutionRecord | None:
        return self._executions.get(exec_id)

    def _load_exec(self, raw: bytes, exec_id: str) -> ExecutionRecord:
        return self._executions.load(raw, exec_id)

    def put_execution(self, rec: ExecutionRecord) -> None:
        """Write an execution record durably (``Executions.put``)."""
        self._executions.put(rec)

    def finish_execution(self, rec: ExecutionRecord) -> None:
        """Write a run's outcome and give up its ownership in one durable write (``Executions.finish``)."""
        self._executions.finish(rec)

    def list_executions(self) -> list[ExecutionRecord]:
        """Every execution, oldest first."""
        return self._executions.all()

    def delete_execution(self, exec_id: str, check: Callable[[ExecutionRecord], None] | None = None) -> bool:
        """Delete an execution and all its operation records (staged ones too).

        ``check`` sees the execution record in the deleting transaction and raises to keep
        it: a check made before, in another transaction, could pass just before another
        driver takes the execution's lock (``acquire``) to resume it.
        Returns whether there was anything to delete.  The freed pages are reused by later
        writes; the data file itself does not shrink.
        """
        with self._lock:
            key = self._exec_key(exec_id)
            prefix = key + b"\0"

            def delete(txn: Txn, sh: SharedEnv) -> bool:
                if check is not None:
                    raw = txn.get(key, db=sh.executions)
                    if raw is not None:
                        check(self._load_exec(raw, exec_id))
                found = bool(txn.delete(key, db=sh.executions))
                cur = txn.cursor(db=sh.ops)
                if cur.set_range(prefix):
                    while cur.key().startswith(prefix):
                        cur.delete()  # moves to the next record
                        found = True
                return found

            self._group.drain()
            self._blobs.forget(key)  # its directory goes: the next value of this id starts a new file
            found = self._write(delete)
            blobs.remove_all(self.path, exec_id)  # after the records: a crash in between leaves only orphans
            return self._group.discard(exec_id) or found

    def acquire(self, exec_id: str, make_new: Callable[[], ExecutionRecord]) -> tuple[ExecutionRecord, bool]:
        """Take the execution's lock, creating it with ``make_new()`` if new (``Ownership.acquire``)."""
        return self._ownership.acquire(exec_id, make_new)

    def sweep_blobs(self, exec_id: str) -> int:
        """Remove the execution's blob files no committed record refers to (a crash's leftovers); how many.

        Call only while holding the execution (``acquire`` does): nobody else writes its blobs then.
        """
        if self.readonly:
            return 0
        with self._lock:
            self._group.drain()  # a batch being written may have a blob not yet committed
            # Another process may have swept or deleted this store session's open file since its
            # last commit (or this sweep may): a run never appends to a file it did not create.
            self._blobs.forget(self._exec_key(exec_id))
            if not blobs.has_blobs(self.path, exec_id):
                return 0  # the common case: an execution without large values costs one listdir
            prefix = self._exec_key(exec_id) + b"\0"
            values = self._read(lambda txn, sh: list(scan(txn, sh.ops, prefix).values()))
            return blobs.sweep(self.path, exec_id, values)

    def release(self, exec_id: str) -> None:
        """Clear the execution's owner; its status stays (``Ownership.release``)."""
        self._ownership.release(exec_id)

    # -- operations (one record: ``SingleOp``; many: ``OpReads``) ---------------------------
    def get_op(self, exec_id: str, parent_id: str, op_id: str) -> OpRecord | None:
        """The record of one operation, staged or committed."""
        return self._single.get(exec_id, parent_id, op_id)

    def get_op_version(self, exec_id: str, parent_id: str, op_id: str) -> tuple[OpRecord | None, bytes | None]:
        """``get_op`` and the record's stored bytes: the version ``compare_and_set`` compares against."""
        return self._single.get_version(exec_id, parent_id, op_id)

    def compare_and_set(self, exec_id: str, parent_id: str, op_id: str, version: bytes | None,
                        rec: OpRecord) -> tuple[bool, OpRecord | None]:
        """Write ``rec`` durably iff the operation is still at ``version`` and not terminal
        (``SingleOp.compare_and_set``): for completions from outside the driver and its timeouts."""
        return self._single.compare_and_set(exec_id, parent_id, op_id, version, rec)

    def children(self, exec_id: str, parent_id: str) -> list[OpRecord]:
        """The records whose parent is ``parent_id`` ("" = root), in no particular order."""
        return self._reads.children(exec_id, parent_id)

    def branch_records(self, exec_id: str, batch_op_id: str) -> dict[int, OpRecord]:
        """The item records of a parallel/map, by index (``OpReads.branch_records``)."""
        return self._reads.branch_records(exec_id, batch_op_id)

    def branch_raw(self, exec_id: str, batch_op_id: str) -> dict[int, Any]:
        """``branch_records`` undecoded (``OpReads.branch_raw``)."""
        return self._reads.branch_raw(exec_id, batch_op_id)

    def branch_outcomes(self, exec_id: str, batch_op_id: str, plain: int) -> tuple[list[int], dict[int, Any]]:
        """Plain successes' indices and every other item record undecoded (``OpReads.branch_outcomes``)."""
        return self._reads.branch_outcomes(exec_id, batch_op_id, plain)

    def branch_each(self, exec_id: str, batch_op_id: str, indices: Any, fn: Callable[[int, Any], None]) -> None:
        """``fn(index, stored bytes)`` for items left in the store (``OpReads.branch_each``)."""
        self._reads.branch_each(exec_id, batch_op_id, indices, fn)

    def subtree(self, exec_id: str, op_id: str) -> dict[str, OpRecord]:
        """Every descendant of ``op_id`` (not itself), by op id, from one consistent snapshot."""
        return self._reads.subtree(exec_id, op_id)

    def ops(self, exec_id: str) -> list[OpRecord]:
        """All records of an execution, staged or committed."""
        return self._reads.ops(exec_id)

    def parents_with_children(self, exec_id: str) -> set[str]:
        """The ids of operations that have at least one child record (root is "")."""
        return self._reads.parents_with_children(exec_id)
