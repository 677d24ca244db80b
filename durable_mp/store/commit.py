"""Group commit: staged records, one committer thread, one fsync per batch.

``Store`` has one ``GroupCommit``; it alone owns the staged overlay, the batch being
committed, the committer thread and the lock that guards them.  Records are staged in
an in-memory overlay (visible to reads at once).  The committer thread writes a batch in
one durable transaction when it is due (``flush_count`` records, or ``flush_seconds``
after its oldest record); while that commit runs, the next batch gathers, so batches
size themselves to the fsync latency and the driver never waits for the disk.
``flush()`` waits until everything staged is durable; staging blocks (back-pressure) only
if ``BACKPRESSURE_FACTOR`` batches pile up behind a slow disk.  A batch holding a large
value (``blobs.BLOB_BYTES``, a numpy result) is due at once: waiting would gather only a
few more of them, while the disk could be writing the first.

A batch is never dropped.  A commit that fails is retried with the same batch
(``COMMIT_ATTEMPTS`` in all, pauses doubling from ``COMMIT_RETRY_DELAY_S``), the batch
staying visible to reads meanwhile.  If every attempt fails the store is unwritable and
the failure *latches*: one ``CheckpointFailedError`` (a ``BaseException``, so a handler's
``except Exception`` cannot swallow it), raised again by every later stage and flush, so
the execution stops as interrupted and can never be recorded SUCCEEDED with records
missing.  The unwritten batch stays in the overlay; the committer thread ends.

A record never moves backwards (``store.forward``): staging a record over a newer one
of the same key, staged or being committed, is refused here; over a committed one, the
committing transaction refuses it (``Store``).  Either way the record is not written and
the refusal latches like an unwritable store: every later stage and flush raises it, so
the execution stops instead of running on from a state the engine got wrong.
"""

from __future__ import annotations

import functools
import shutil
import threading
import time
from typing import Any, Callable, Iterable, TypeVar

from durable_mp.core.errors import InvariantError
from durable_mp.core.records import branch_key_list
from durable_mp.exceptions import CheckpointFailedError
from durable_mp.store.blobs import BLOB_BYTES
from durable_mp.store.forward import backwards, refusal
from durable_mp.store.records import MAX_ID_BYTES, SEP, check_id

COMMITTER_POLL_SECONDS = 0.05  # the committer re-reads the clock at least this often (injected clocks)
BACKPRESSURE_FACTOR = 8  # staging blocks once this many flush_counts wait behind a slow commit
COMMIT_ATTEMPTS = 5  # tries of one write before the store counts as unwritable
COMMIT_RETRY_DELAY_S = 0.05  # pause after the first failed try; doubles after each (0.75 s over 5 tries)
COMMIT_RETRY_BACKOFF = 2.0  # factor between successive pauses

T = TypeVar("T")
Group = dict[str, Any]  # op key -> pickled record (bytes, or a received buffer kept as is)
Batch = dict[tuple[str, str], Group]  # (exec_id, parent_id) -> its records
Items = list[tuple[bytes, Any]]  # full LMDB keys and values, sorted


def with_retries(attempt: Callable[[], T]) -> T:
    """``attempt()``, tried up to ``COMMIT_ATTEMPTS`` times with growing pauses; raises the last error."""
    delay = COMMIT_RETRY_DELAY_S
    for _ in range(COMMIT_ATTEMPTS - 1):
        try:
            return attempt()
        except Exception:  # noqa: BLE001 - a full disk or an I/O error may pass; the last try reports
            time.sleep(delay)
            delay *= COMMIT_RETRY_BACKOFF
    return attempt()


def unwritable(where: str, what: str, cause: BaseException) -> CheckpointFailedError:
    """The latched error: which store, what failed, and that a re-run resumes."""
    try:
        space = f"; its file system has {shutil.disk_usage(where).free:,} bytes free"
    except OSError:
        space = ""
    error = CheckpointFailedError(
        f"the durable_mp store {where} is unwritable: {what} failed {COMMIT_ATTEMPTS} times (last error: "
        f"{cause}{space}). The execution was stopped as interrupted and stays RUNNING; what was committed before "
        f"is kept. Make the store writable again (free disk space, fix the file system) and re-run the same "
        f"execution: it resumes from its last committed checkpoint.")
    error.__cause__ = cause
    return error


class GroupCommit:
    """The staging overlay of one ``Store`` and the thread that commits it.

    ``write(items)`` puts sorted ``(key, value)`` pairs in one durable transaction;
    ``check_group(exec_id, parent_id)`` raises unless records may be staged there (it
    runs once per group and batch, off the per-record path).  ``lock`` also guards the
    caller's reads of ``pending``/``pending_items`` together with the committed data.
    """

    def __init__(self, write: Callable[[Items], None], check_group: Callable[[str, str], None], *, where: str,
                 flush_count: int, flush_seconds: float, clock: Callable[[], float]) -> None:
        self._write = write
        self._check_group = check_group
        self._where = where
        self._flush_count = flush_count
        self._flush_seconds = flush_seconds
        self._clock = clock
        # Guards everything below, so a flush never loses a record staged by another thread.
        # Store takes it before the environment's lock, never after it.
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self._staged: Batch = {}
        self._staged_count = 0
        self._staged_since = 0.0
        self._staged_large = False  # a large value is staged: the batch is due now
        # The batch the committer is writing: still visible to reads until committed.
        self._committing: Batch | None = None
        self._failure: CheckpointFailedError | None = None  # latched: the store is unwritable
        self._refused: InvariantError | None = None  # latched: a write would have moved a record backwards
        self._committer: threading.Thread | None = None
        self._closing = False
        self.stats = {"flushes": 0, "records_written": 0, "bytes_written": 0}

    # -- staging (the checkpoint hot path) ---------------------------------------------------
    def stage_many(self, exec_id: str, parent_id: str, entries: Iterable[tuple[str, Any]]) -> None:
        """Stage several pickled records of one parent under one lock.

        No syscall but a vDSO clock read; keys are checked only when they are not plain
        short ASCII.  ``data`` may be ``bytes`` or a buffer received out of band (kept, not copied).
        """
        with self.lock:
            group = self._group_for(exec_id, parent_id)
            older = self._committing.get((exec_id, parent_id)) if self._committing is not None else None
            before = len(group)
            large = False
            for key, data in entries:
                if not (key.__class__ is str and key.isascii() and len(key) <= MAX_ID_BYTES) or SEP in key:
                    check_id("op_id", key)
                old = group.get(key)
                if old is None and older is not None:
                    old = older.get(key)
                if old is not None:
                    self._check_forward(exec_id, parent_id, key, old, data)
                group[key] = data
                if len(data) >= BLOB_BYTES:
                    large = True
            self._added(len(group) - before)
            if large:
                self._staged_large = True
                self._start_commit(block=False)  # hands it over now unless a commit is running

    def stage_items(self, exec_id: str, parent_id: str, indices: list[int], records: list[Any]) -> None:
        """Stage the records of batch items ``indices`` under their ``branch_key``s (keys need no check)."""
        with self.lock:
            group = self._group_for(exec_id, parent_id)
            keys = branch_key_list(indices)
            older = self._committing.get((exec_id, parent_id)) if self._committing is not None else None
            if (group and not group.keys().isdisjoint(keys)) or (older and not older.keys().isdisjoint(keys)):
                for key, data in zip(keys, records, strict=False):  # rare: an item written before
                    old = group.get(key)
                    if old is None and older is not None:
                        old = older.get(key)
                    if old is not None:
                        self._check_forward(exec_id, parent_id, key, old, data)
            before = len(group)
            group.update(zip(keys, records, strict=False))
            self._added(len(group) - before)

    def _check_forward(self, exec_id: str, parent_id: str, key: str, old: Any, new: Any) -> None:
        """Refuse (and latch) a record that would move the uncommitted one of its key backwards."""
        how = backwards(old, new)
        if how is not None:
            raise self.refuse(refusal(f"{exec_id}/{parent_id}/{key}", how))

    def refuse(self, error: InvariantError) -> InvariantError:
        """Latch a refused write: every later stage and flush raises it (the first one is kept)."""
        with self.lock:
            if self._refused is None:
                self._refused = error
            self._changed.notify_all()
            return self._refused

    def _group_for(self, exec_id: str, parent_id: str) -> Group:
        """The staged group of one parent (under ``lock``); raises once the store is latched unwritable."""
        if self._failure is not None:
            raise self._failure
        if self._refused is not None:
            raise self._refused
        group = self._staged.get((exec_id, parent_id))
        return group if group is not None else self._new_group(exec_id, parent_id)

    def _added(self, added: int) -> None:
        if added:
            was = self._staged_count
            self._staged_count = was + added
            if was == 0:
                self._wake_committer()
            if self._staged_count >= self._flush_count:
                self._start_commit(block=self._staged_count >= BACKPRESSURE_FACTOR * self._flush_count)

    def _new_group(self, exec_id: str, parent_id: str) -> Group:
        self._check_group(exec_id, parent_id)
        if not self._staged_count:
            self._staged_since = self._clock()
        group: Group = {}
        self._staged[(exec_id, parent_id)] = group
        return group

    # -- flushing --------------------------------------------------------------------------
    def flush(self) -> int:
        """Make every staged record durable before returning; return how many were staged."""
        with self.lock:
            count = self._staged_count
            if count:
                self._start_commit(block=True)
            self.drain()
            return count

    def maybe_flush(self) -> None:
        """Start committing the staged batch if it is due (does not wait for the commit)."""
        with self.lock:
            self.raise_if_failed()
            if self._staged_count and (self._staged_count >= self._flush_count
                                       or self._clock() - self._staged_since >= self._flush_seconds):
                self._start_commit(block=False)

    def flush_due(self) -> float | None:
        """Seconds until the staged batch is due (0 = now); None if nothing is staged.

        Informational: the committer thread commits due batches by itself.
        """
        with self.lock:
            if not self._staged_count:
                return None
            if self._staged_count >= self._flush_count:
                return 0.0
            return max(0.0, self._staged_since + self._flush_seconds - self._clock())

    def drain(self) -> None:
        """Wait until no commit is in flight (caller holds ``lock``); raise the latched failure."""
        while self._committing is not None and self._failure is None:
            self._changed.wait()
        if self._failure is not None:
            raise self._failure
        if self._refused is not None:
            raise self._refused

    def _start_commit(self, *, block: bool) -> None:
        """Hand the staged batch to the committer thread (caller holds the lock).

        One commit is in flight at a time; while it runs, new records gather into the
        next batch, so batches size themselves to the fsync latency.  ``block`` waits for
        the in-flight commit first (flush, or back-pressure on a runaway batch).
        """
        if self._committing is not None and not block:
            return
        self.drain()
        if not self._staged_count:
            return
        self._committing, self._staged = self._staged, {}
        self._staged_count = 0
        self._staged_large = False
        self._wake_committer()

    def _wake_committer(self) -> None:
        """Start (or wake) the committer so it commits this batch once it is due."""
        if self._committer is None or not self._committer.is_alive():
            self._closing = False
            self._committer = threading.Thread(target=self._commit_loop, name="durable_mp-commit", daemon=True)
            self._committer.start()
        else:
            self._changed.notify_all()

    # -- the committer thread --------------------------------------------------------------
    def _commit_loop(self) -> None:
        """Write handed-off batches, and hand off staged ones once due, until closed or latched."""
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                try:
                    with_retries(functools.partial(self._commit, batch))
                except Exception as exc:  # noqa: BLE001 - every attempt failed: the store is unwritable
                    self.latch(exc, "committing a batch of checkpoints")
                    return
                with self.lock:
                    self._committing = None
                    self._changed.notify_all()
        except BaseException as exc:  # noqa: BLE001 - a flush must never wait for a thread that is gone
            self.latch(exc, "the commit thread")

    def _next_batch(self) -> Batch | None:
        with self.lock:
            while self._committing is None:
                if self._failure is not None:
                    return None
                if self._staged_count:
                    due_in = self._staged_since + self._flush_seconds - self._clock()
                    if self._closing or self._staged_large or self._staged_count >= self._flush_count or due_in <= 0:
                        self._committing, self._staged = self._staged, {}
                        self._staged_count = 0
                        self._staged_large = False
                        break
                    self._changed.wait(timeout=min(due_in, COMMITTER_POLL_SECONDS))
                elif self._closing:
                    return None
                else:
                    self._changed.wait()
            return self._committing

    def _commit(self, batch: Batch) -> None:
        """One attempt at writing ``batch`` durably (the seam tests replace to inject failures)."""
        items: Items = []
        size = 0
        for (exec_id, parent_id), group in batch.items():
            prefix = f"{exec_id}{SEP}{parent_id}{SEP}"
            items.extend([(f"{prefix}{op}".encode(), data) for op, data in group.items()])
            size += sum(map(len, group.values())) + len(prefix.encode()) * len(group) + sum(map(len, group))
        items.sort()  # B-tree inserts in key order touch each page once: ~2x faster commits
        self._write(items)
        self.stats["flushes"] += 1
        self.stats["records_written"] += len(items)
        self.stats["bytes_written"] += size

    # -- failure ---------------------------------------------------------------------------
    def latch(self, cause: BaseException, what: str) -> CheckpointFailedError:
        """Count the store as unwritable from now on; return the error every later write raises."""
        with self.lock:
            if self._failure is None:
                self._failure = unwritable(self._where, what, cause)
            self._changed.notify_all()
            return self._failure

    @property
    def failure(self) -> CheckpointFailedError | None:
        """The latched failure, if the store turned out unwritable."""
        return self._failure

    def raise_if_failed(self) -> None:
        failure = self._failure
        if failure is not None:
            raise failure
        refused = self._refused
        if refused is not None:
            raise refused

    # -- reads and deletes (caller holds ``lock``) -------------------------------------------
    def pending(self, key: tuple[str, str]) -> list[Group]:
        """Uncommitted groups for ``key``, newest first."""
        out = []
        group = self._staged.get(key)
        if group is not None:
            out.append(group)
        if self._committing is not None:
            group = self._committing.get(key)
            if group is not None:
                out.append(group)
        return out

    def pending_items(self) -> list[tuple[tuple[str, str], Group]]:
        """Every uncommitted group, oldest first."""
        items = list(self._committing.items()) if self._committing is not None else []
        return items + list(self._staged.items())

    def discard(self, exec_id: str) -> bool:
        """Drop the staged records of an execution (after ``drain``); whether there were any."""
        found = False
        for key in [k for k in self._staged if k[0] == exec_id]:
            dropped = self._staged.pop(key)
            self._staged_count -= len(dropped)
            found = found or bool(dropped)
        return found

    # -- shutdown --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the committer thread once it has written what is staged (or the store latched)."""
        with self.lock:
            self._closing = True
            self._changed.notify_all()
            committer = self._committer
        if committer is not None and committer is not threading.current_thread():
            committer.join()
        with self.lock:
            self._committer = None
