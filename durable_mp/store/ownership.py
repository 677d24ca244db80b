"""Who runs an execution: its lock, the lease its holder renews, and the lock's release.

The owner is a (pid, process start time) pair written into the execution record in one
write transaction (``records.claim``), so a recycled pid is not mistaken for a live
owner and a dead owner's lock is simply taken over; within the process, one thread at a
time holds it (``records.HOLDERS``).  A holder renews its lease until it releases, so a
driver on another host waits it out.  The ``Store`` has one ``Ownership`` and writes
through it; this module only decides what the transactions write.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import lmdb

from durable_mp.exceptions import StoreError
from durable_mp.store.env import SharedEnv
from durable_mp.store.records import (
    HOLDERS,
    ExecutionRecord,
    claim,
    lease_period,
    owned_new,
    renewed,
    this_process,
    unclaim,
)

log = logging.getLogger("durable_mp.store")

Txn = Any  # an lmdb.Transaction (py-lmdb ships no type information)


class Ownership:
    """The execution locks and leases of one ``Store``."""

    def __init__(self, store: Any) -> None:
        self.store = store  # the ``facade.Store`` whose transactions these are
        self.leases: dict[str, threading.Event] = {}  # held executions -> stops their lease renewal

    def stop_leases(self) -> None:
        """The store closes: stop renewing every lease it holds."""
        for lease in self.leases.values():
            lease.set()
        self.leases.clear()

    def acquire(self, exec_id: str, make_new: Callable[[], ExecutionRecord]) -> tuple[ExecutionRecord, bool]:
        """Take the execution's lock; create it with ``make_new()`` if it does not exist.

        Returns ``(record, created)``.  Raises ``ExecutionLockedError`` while another live
        process owns a RUNNING execution, or another thread of this one holds it (the
        lock is not re-entrant).  A dead owner's lock is taken over, and a RUNNING
        execution taken over starts a new run (``runs`` + 1, ``started_ts`` = now).
        """
        store = self.store
        key = store._exec_key(exec_id)
        me = this_process()
        made: list[ExecutionRecord] = []

        def take(txn: Txn, sh: SharedEnv) -> tuple[ExecutionRecord, bool]:
            raw = txn.get(key, db=sh.executions)
            if raw is None:
                if not made:  # a retried transaction (map grown) must not call make_new twice
                    made.append(make_new())
                rec = owned_new(made[0], me, time.time())
                if rec.exec_id != exec_id:
                    raise ValueError(f"make_new() returned execution {rec.exec_id!r}, not {exec_id!r}")
                created = True
            else:
                rec, created = claim(store._load_exec(raw, exec_id), me, time.time()), False
            txn.put(key, rec.dumps(), db=sh.executions)
            return rec, created

        store._group.raise_if_failed()
        store._writable()
        HOLDERS.hold((store._env_id, exec_id))  # before the transaction: two threads cannot both pass
        try:
            out: tuple[ExecutionRecord, bool] = store._write(take)
        except BaseException:
            HOLDERS.drop((store._env_id, exec_id))
            raise
        try:
            store.sweep_blobs(exec_id)
        except (OSError, StoreError):
            pass  # leftovers only cost space; the next acquire tries again
        self.keep_lease(exec_id)
        return out

    def keep_lease(self, exec_id: str) -> None:
        """Renew the lease of a held execution until it is released (a driver on another host waits it out)."""
        store = self.store
        stop = threading.Event()
        old = self.leases.pop(exec_id, None)
        if old is not None:
            old.set()
        self.leases[exec_id] = stop
        key = store._exec_key(exec_id)
        me = this_process()

        def renew(txn: Txn, sh: SharedEnv) -> bool:
            raw = txn.get(key, db=sh.executions)
            rec = None if raw is None else renewed(store._load_exec(raw, exec_id), me, time.time())
            if rec is not None:
                txn.put(key, rec.dumps(), db=sh.executions)
            return rec is not None

        def keep() -> None:
            while not stop.wait(lease_period()):
                try:
                    if not store._write(renew):
                        return  # no longer ours (finished and released, deleted)
                except (StoreError, lmdb.Error) as exc:
                    if store._shared is None:
                        return  # closed
                    log.warning("could not renew the lease of execution %r: %s", exec_id, exc)

        threading.Thread(target=keep, daemon=True, name=f"durable_mp-lease-{exec_id[:40]}").start()

    def release(self, exec_id: str) -> None:
        """Clear the execution's owner (its status stays).  A live other owner is left alone.

        On a store that turned out unwritable this is best effort and never raises: the
        lock of a process that ended, or of a thread no longer holding it, is taken over.
        """
        store = self.store
        key = store._exec_key(exec_id)
        if not HOLDERS.drop((store._env_id, exec_id)):
            return  # another live thread of this process holds it
        lease = self.leases.pop(exec_id, None)
        if lease is not None:
            lease.set()
        me = this_process()

        def cleared(txn: Txn, sh: SharedEnv) -> ExecutionRecord | None:
            raw = txn.get(key, db=sh.executions)
            return None if raw is None else unclaim(store._load_exec(raw, exec_id), me)

        def clear(txn: Txn, sh: SharedEnv) -> None:
            rec = cleared(txn, sh)
            if rec is not None:
                txn.put(key, rec.dumps(), db=sh.executions)

        try:
            if store._read(cleared) is not None:  # a run that ended with ``finish_execution`` has nothing to clear
                store._write(clear)
        except StoreError:
            if store._group.failure is None:
                raise  # on a latched store, the CheckpointFailedError already reported says it all

