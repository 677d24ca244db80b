"""Execution records: read, write, list, and a run's last write.

A ``Store`` has one ``Executions``.  An execution record commits at once (no group commit):
it is written a few times per run, and ``acquire``/``release`` (``ownership``) and the
deletion of an execution read it inside their own write transactions.
"""

from __future__ import annotations

from typing import Any

from durable_mp.exceptions import StoreError
from durable_mp.store.records import ExecutionRecord, this_process, unclaim


class Executions:
    """The execution records of one ``Store``."""

    def __init__(self, store: Any) -> None:
        self.store = store  # the ``facade.Store`` whose records these are

    def get(self, exec_id: str) -> ExecutionRecord | None:
        key = self.store._exec_key(exec_id)
        raw = self.store._read(lambda txn, sh: txn.get(key, db=sh.executions))
        return None if raw is None else self.load(raw, exec_id)

    def load(self, raw: bytes, exec_id: str) -> ExecutionRecord:
        """Decode a stored execution record; a damaged one is a ``StoreError`` that names it."""
        try:
            return ExecutionRecord.loads(raw)
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"execution {exec_id!r} in {self.store.path} cannot be decoded: {exc!r}") from exc

    def put(self, rec: ExecutionRecord) -> None:
        """Write an execution record durably (retried; ``CheckpointFailedError`` if the store stays unwritable)."""
        key, data = self.store._exec_key(rec.exec_id), rec.dumps()
        self.store._write_or_latch(lambda txn, sh: txn.put(key, data, db=sh.executions),
                                   f"writing execution {rec.exec_id!r}")

    def finish(self, rec: ExecutionRecord) -> None:
        """Write a run's outcome and give up its ownership in one durable write.

        ``release`` afterwards finds nothing to clear and writes nothing: a run's end
        costs one fsync, not two.  The process-wide holder is still dropped by ``release``.
        """
        # Through the Store's put_execution, as every execution write goes (one place to watch).
        self.store.put_execution(unclaim(rec, this_process()) or rec)  # a live other owner's claim stays

    def all(self) -> list[ExecutionRecord]:
        """Every execution, oldest first."""
        raws = self.store._read(lambda txn, sh: list(txn.cursor(db=sh.executions)))
        recs = [self.load(raw, key.decode(errors="replace")) for key, raw in raws]
        return sorted(recs, key=lambda r: r.created_ts)
