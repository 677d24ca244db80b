"""Reads of a batch's item records and of whole subtrees: the staged overlay over committed records.

A ``Store`` has one ``OpReads`` and answers its multi-record reads through it; each read
takes the store's lock, so the records it sees, staged and committed, are one state.
Single records (``get_op``) and every write stay in ``facade``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from durable_mp.core.records import BRANCH_KEY_PREFIX, OpRecord
from durable_mp.store import blobs
from durable_mp.store.branch_scan import first_bytes, read_each, scan_branches, scan_outcomes
from durable_mp.store.env import SharedEnv
from durable_mp.store.records import SEP, check_id

Txn = Any  # an lmdb.Transaction (py-lmdb ships no type information)


def scan(txn: Txn, db: Any, prefix: bytes) -> dict[str, Any]:
    """``{rest of key: value}`` for every committed key starting with ``prefix``."""
    out: dict[str, Any] = {}
    cur = txn.cursor(db=db)
    if not cur.set_range(prefix):
        return out
    n = len(prefix)
    for key, value in cur.iternext():
        if not key.startswith(prefix):
            break
        out[key[n:].decode()] = value
    return out


class OpReads:
    """The multi-record reads of one ``Store``."""

    def __init__(self, store: Any) -> None:
        self.store = store  # the ``facade.Store`` whose records these are

    def children(self, exec_id: str, parent_id: str) -> list[OpRecord]:
        """The records whose parent is ``parent_id`` ("" = root), in no particular order."""
        return list(self._children(exec_id, parent_id).values())

    def branch_records(self, exec_id: str, batch_op_id: str) -> dict[int, OpRecord]:
        """The item records of a parallel/map, by index (their keys are ``branch_key(index)``)."""
        return {int(key[1:]): rec for key, rec in self._children(exec_id, batch_op_id).items()
                if key.startswith(BRANCH_KEY_PREFIX)}

    def branch_raw(self, exec_id: str, batch_op_id: str) -> dict[int, Any]:
        """``branch_records`` undecoded (``OpRecord.dumps()`` bytes): a resume of a big map
        probes their statuses and decodes a result only when it is asked for."""
        with self.store._lock:
            prefix = self.store._prefix(exec_id, batch_op_id) + BRANCH_KEY_PREFIX.encode()

            found: dict[int, Any] = self.store._read(lambda txn, sh: scan_branches(txn, sh.ops, prefix))
            if 0 in first_bytes(found.values()):  # a large value is a reference to its blob file: read it
                for index, data in found.items():
                    if data[:1] == b"\0" and blobs.is_ref(data):
                        found[index] = blobs.load(self.store.path, data, f"{exec_id}/{batch_op_id}/#{index}")
            for group in reversed(self.store._group.pending((exec_id, batch_op_id))):
                found.update((int(key[1:]), data) for key, data in group.items() if key.startswith(BRANCH_KEY_PREFIX))
            return found

    def branch_outcomes(self, exec_id: str, batch_op_id: str, plain: int) -> tuple[list[int], dict[int, Any]]:
        """``(indices, others)``: items whose stored record starts with the byte ``plain`` (a plain
        success: their values stay in the store), and every other item record undecoded, as
        ``branch_raw`` gives it (staged records included)."""
        with self.store._lock:
            prefix = self.store._prefix(exec_id, batch_op_id) + BRANCH_KEY_PREFIX.encode()
            indices, others = self.store._read(lambda txn, sh: scan_outcomes(txn, sh.ops, prefix, plain))
            for index, data in others.items():  # a large value is a reference to its blob file: read it
                if data[:1] == b"\0" and blobs.is_ref(data):
                    others[index] = blobs.load(self.store.path, data, f"{exec_id}/{batch_op_id}/#{index}")
            staged: dict[int, Any] = {}
            for group in reversed(self.store._group.pending((exec_id, batch_op_id))):
                staged.update((int(key[1:]), data) for key, data in group.items() if key.startswith(BRANCH_KEY_PREFIX))
            if staged:  # uncommitted records win over stored ones
                indices = [i for i in indices if i not in staged]
                others.update(staged)
            return indices, others

    def branch_each(self, exec_id: str, batch_op_id: str, indices: Any, fn: Callable[[int, Any], None]) -> None:
        """``fn(index, stored bytes)`` for each item of ``indices`` whose record ``branch_outcomes`` left
        in the store, in one read transaction (its values are not all held at once)."""
        with self.store._lock:
            parent = self.store._prefix(exec_id, batch_op_id)
            self.store._read(lambda txn, sh: read_each(txn, sh.ops, parent, indices, fn))

    def _children(self, exec_id: str, parent_id: str) -> dict[str, OpRecord]:
        with self.store._lock:
            prefix = self.store._prefix(exec_id, parent_id)
            found = self.store._read(lambda txn, sh: scan(txn, sh.ops, prefix))
            for group in reversed(self.store._group.pending((exec_id, parent_id))):
                found.update(group)
            return {key: self.store._load(data, f"{exec_id}/{parent_id}/{key}") for key, data in found.items()}

    def subtree(self, exec_id: str, op_id: str) -> dict[str, OpRecord]:
        """Every descendant of ``op_id`` (not itself), by op id, from one consistent snapshot."""
        with self.store._lock:
            self.store._exec_key(exec_id)
            check_id("op_id", op_id)

            def walk(txn: Txn, sh: SharedEnv) -> dict[str, OpRecord]:
                out: dict[str, OpRecord] = {}
                todo = [op_id]
                while todo:
                    parent = todo.pop()
                    found = scan(txn, sh.ops, f"{exec_id}{SEP}{parent}{SEP}".encode())
                    for group in reversed(self.store._group.pending((exec_id, parent))):
                        found.update(group)
                    for key, data in found.items():
                        rec = self.store._load(data, f"{exec_id}/{parent}/{key}")
                        if rec.op_id not in out and rec.op_id != op_id:
                            out[rec.op_id] = rec  # keys of batch items are their index, not their id
                            todo.append(rec.op_id)
                return out

            tree: dict[str, OpRecord] = self.store._read(walk)
            return tree

    def ops(self, exec_id: str) -> list[OpRecord]:
        """All records of an execution, staged or committed."""
        with self.store._lock:
            prefix = self.store._exec_key(exec_id) + b"\0"
            found = self.store._read(lambda txn, sh: scan(txn, sh.ops, prefix))  # "parent\0op" -> data
            for (ex, parent), group in self.store._group.pending_items():
                if ex == exec_id:
                    found.update((f"{parent}{SEP}{op}", data) for op, data in group.items())
            return [self.store._load(data, f"{exec_id}/{key}") for key, data in found.items()]

    def parents_with_children(self, exec_id: str) -> set[str]:
        """The ids of operations that have at least one child record (root is "")."""
        with self.store._lock:
            prefix = self.store._exec_key(exec_id) + b"\0"
            n = len(prefix)

            def parents(txn: Txn, sh: SharedEnv) -> set[str]:
                out: set[str] = set()
                cur = txn.cursor(db=sh.ops)
                ok = cur.set_range(prefix)
                while ok:
                    key = cur.key()
                    if not key.startswith(prefix):
                        break
                    parent = key[n:key.index(b"\0", n)]
                    out.add(parent.decode())
                    ok = cur.set_range(prefix + parent + b"\x01")  # skip this parent's children
                return out

            found: set[str] = self.store._read(parents)
            found.update(parent for (ex, parent), group in self.store._group.pending_items() if ex == exec_id and group)
            return found
