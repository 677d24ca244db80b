"""What a parallel/map records about itself and its branches, by nesting type and serdes.

NESTED (the default) records a CONTEXT operation per branch (``ParallelBranch`` /
``MapIteration``); the branch's operations are its children.  FLAT runs each branch in a
*virtual* context, as the reference does: the branch's operations are recorded with the
batch operation as their parent, while their ids are still derived from the branch's id
(``operation_id(operation_id(batch, index), n)``), so replay stays deterministic.

durable_mp still keeps one outcome row per FLAT item under the batch (the key
``branch_key(index)``): the engine resumes, counts and rebuilds the ``BatchResult`` from
those rows instead of re-running the branch body as the reference does.  The batch record
says ``{"nesting": "FLAT"}`` (from its start), and every view (history, operation tree,
test runner) leaves those rows out, so what is shown is the reference's history.
"""

from __future__ import annotations

from typing import Any

from durable_mp import serdes as _serdes
from durable_mp.config import NestingType
from durable_mp.exceptions import SerDesError

NESTING_KEY = "nesting"  # in a batch record's extra: "FLAT" for NestingType.FLAT
FLAT = NestingType.FLAT.value


def nesting_extra(nesting_type: NestingType) -> dict[str, str]:
    """The batch record's ``extra`` entries that say how its branches are nested."""
    return {NESTING_KEY: FLAT} if nesting_type is NestingType.FLAT else {}


def is_flat(extra: dict | None) -> bool:
    """Whether a batch record (its ``extra``) ran its branches FLAT."""
    return bool(extra) and extra.get(NESTING_KEY) == FLAT  # type: ignore[union-attr]


def branch_record_parent(batch_op_id: str, branch_op_id: str, flat: bool) -> str:
    """``parent_id`` of the operations a branch records: the branch, or under FLAT the batch."""
    return batch_op_id if flat else branch_op_id


def batch_payload(config: Any, batch: Any, op_id: str, execution_id: str) -> Any:
    """The payload checkpointed with a finished batch when it has a configured serdes, else None.

    The reference checkpoints the ``BatchResult`` with ``serdes`` (the default serializer
    when only ``item_serdes`` is set).  Only then is it encoded here: with the default
    serdes, the history rebuilds it from the item records, which costs a big map nothing.
    A serdes that cannot encode a ``BatchResult`` leaves the batch without a payload
    (the reference would fail the batch; the items' results are all checkpointed).
    """
    if config.serdes is None and config.item_serdes is None:
        return None
    try:
        return _serdes.serialize(config.serdes, batch, op_id=op_id, execution_id=execution_id,
                                 what="the BatchResult")
    except SerDesError:
        return None
