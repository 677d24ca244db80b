"""One operation's record: read it (staged or committed), read its version, compare-and-set it.

A ``Store`` has one ``SingleOp``.  ``compare_and_set`` is how a record is completed from
outside the driver (a callback, a heartbeat) or by the driver's own timeouts: the check and
the write are one LMDB write transaction.  Staged batches and reads of many records are
``commit.GroupCommit``'s and ``op_reads.OpReads``'s.
"""

from __future__ import annotations

from typing import Any

from durable_mp.core.records import OpRecord
from durable_mp.store.env import SharedEnv
from durable_mp.store.records import check_id

Txn = Any  # an lmdb.Transaction (py-lmdb ships no type information)


class SingleOp:
    """The single-record reads and the compare-and-set of one ``Store``."""

    def __init__(self, store: Any) -> None:
        self.store = store  # the ``facade.Store`` whose records these are

    def _stored(self, exec_id: str, parent_id: str, op_id: str) -> Any:
        """The record's bytes, staged or committed; None if there is none.  Call under the store's lock."""
        store = self.store
        for group in store._group.pending((exec_id, parent_id)):
            data = group.get(op_id)
            if data is not None:
                return data
        check_id("op_id", op_id)
        key = store._prefix(exec_id, parent_id) + op_id.encode()
        return store._read(lambda txn, sh: txn.get(key, db=sh.ops))

    def get(self, exec_id: str, parent_id: str, op_id: str) -> OpRecord | None:
        """The record of one operation, staged or committed."""
        with self.store._lock:
            data = self._stored(exec_id, parent_id, op_id)
            return None if data is None else self.store._load(data, f"{exec_id}/{parent_id}/{op_id}")

    def get_version(self, exec_id: str, parent_id: str, op_id: str) -> tuple[OpRecord | None, bytes | None]:
        """``get`` and the record's stored bytes: the version ``compare_and_set`` compares against."""
        with self.store._lock:
            data = self._stored(exec_id, parent_id, op_id)
            if data is None:
                return None, None
            return self.store._load(data, f"{exec_id}/{parent_id}/{op_id}"), bytes(data)

    def compare_and_set(self, exec_id: str, parent_id: str, op_id: str, version: bytes | None,
                        rec: OpRecord) -> tuple[bool, OpRecord | None]:
        """Write ``rec`` durably iff the operation is still at ``version`` and not terminal.

        Of two racing writers that read the same version exactly one wins, and a terminal
        record is never replaced.  Returns ``(written, current record)``; a refused caller
        reads the record again and decides (a heartbeat moved it on: retry; it ended: report
        that).
        """
        store = self.store
        key = store._prefix(exec_id, parent_id) + op_id.encode()
        check_id("op_id", op_id)
        data = rec.dumps()
        where = f"{exec_id}/{parent_id}/{op_id}"

        def swap(txn: Txn, sh: SharedEnv) -> tuple[bool, Any]:
            current = txn.get(key, db=sh.ops)
            stored = None if current is None else bytes(current)
            if stored != version or (stored is not None and store._load(stored, where).is_terminal):
                return False, stored
            txn.put(key, data, db=sh.ops)
            return True, data

        with store._lock:
            store._group.flush()  # nothing staged for it may land after this write
            written, current = store._write_or_latch(swap, f"completing operation {where}")
        return written, None if current is None else store._load(current, where)
