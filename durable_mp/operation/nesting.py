"""What a parallel/map checkpoints about itself, by nesting type and serdes (``core.nesting`` says why)."""

from __future__ import annotations

from typing import Any

from durable_mp import serdes as _serdes
from durable_mp.config import NestingType
from durable_mp.core.nesting import FLAT, NESTING_KEY, is_flat
from durable_mp.core.records import OpRecord
from durable_mp.exceptions import NonDeterministicExecutionError, SerDesError


def nesting_extra(nesting_type: NestingType) -> dict[str, str]:
    """The batch record's ``extra`` entries that say how its branches are nested."""
    return {NESTING_KEY: FLAT} if nesting_type is NestingType.FLAT else {}


def check_nesting(rec: OpRecord, nesting_type: NestingType) -> None:
    """Refuse to replay a batch under the other nesting type (as the reference does).

    NESTED branches' operations hang off their branch, FLAT ones off the batch: replayed
    under the other type, a branch would find none of its checkpoints and run again.
    """
    recorded = FLAT if is_flat(rec.extra) else NestingType.NESTED.value
    if recorded != nesting_type.value:
        raise NonDeterministicExecutionError(
            f"Non-deterministic branch nesting at id={rec.op_id!r}: the batch {rec.name!r} was recorded with "
            f"nesting {recorded}, it now runs with nesting {nesting_type.value}", step_id=rec.op_id)


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
