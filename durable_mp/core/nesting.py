"""How a parallel/map nests its branches, as its record says (read by the engine and the views).

NESTED (the default) records a CONTEXT operation per branch (``ParallelBranch`` /
``MapIteration``); the branch's operations are its children.  FLAT runs each branch in a
*virtual* context, as the reference does: the branch's operations are recorded with the
batch operation as their parent, while their ids are still derived from the branch's id
(``operation_id(operation_id(batch, index), n)``), so replay stays deterministic.

durable_mp still keeps one outcome row per FLAT item under the batch (key
``branch_key(index)``): the engine resumes, counts and rebuilds the ``BatchResult`` from
those rows instead of re-running the branch body as the reference does.  The batch record
carries ``{"nesting": "FLAT"}`` from its start, and the history and the test runner's
operation view leave those rows out, so they show the reference's history.
"""

from __future__ import annotations

from collections.abc import Callable

from durable_mp.core.records import OpRecord, operation_id

NESTING_KEY = "nesting"  # in a batch record's extra
FLAT = "FLAT"  # its value for NestingType.FLAT (the enum lives in config, above core)


def is_flat(extra: dict | None) -> bool:
    """Whether a batch record (its ``extra``) ran its branches FLAT."""
    return bool(extra) and extra.get(NESTING_KEY) == FLAT  # type: ignore[union-attr]


def branch_record_parent(batch_op_id: str, flat: bool) -> str | None:
    """``parent_id`` of the operations a branch records: None for the branch's own id, FLAT the batch."""
    return batch_op_id if flat else None


def flat_branch_ops(batch_op_id: str, index: int, get: Callable[[str], OpRecord | None]) -> list[OpRecord]:
    """The operations FLAT branch ``index`` recorded directly under its batch, in order.

    Nothing in the store names the branch of such an operation; its id does.  A context
    records its operations one after another, so the branch's n-th operation exists only
    if the (n-1)-th does: ids are tried from n = 1 until one is missing.  A missing id may
    still be a virtual child context (``ChildConfig(is_virtual=True)``) that records
    nothing itself: its own operations are looked for before stopping.  ``get(op_id)``
    reads one record under the batch.
    """
    found: list[OpRecord] = []

    def probe(prefix: str) -> bool:
        n = 1
        any_found = False
        while True:
            op_id = operation_id(prefix, n)
            rec = get(op_id)
            if rec is not None:
                found.append(rec)
            elif not probe_virtual(op_id):
                return any_found
            any_found = True
            n += 1

    def probe_virtual(op_id: str) -> bool:
        return get(operation_id(op_id, 1)) is not None and probe(op_id)

    probe(operation_id(batch_op_id, index))
    return found
