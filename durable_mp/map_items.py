"""Where ``durable_mp.map`` finds items already computed, and reads their results (DESIGN §2).

A map execution's input is its ``Plan``: the digest of the computation (function identity
and ``name``), every item's key digest, which items its own ``context.map`` runs and which
it takes from other executions of the same store.  The plan is stored with the execution
when it is created, so a resumed run works on the same split whatever the store holds by
then.  An item is reusable when an execution with the same computation digest and code
fingerprint (``rerun.CODE_KEY``) holds a SUCCEEDED record for its key.

The execution's own result is only a marker: the values stay in the item records and are
read back from there, so a map's results are stored once.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

from durable_mp import serdes as _serdes
from durable_mp.core.digest import DIGEST_BYTES
from durable_mp.core.item_probe import item_status, split_terminal
from durable_mp.core.records import OpRecord, OpStatus
from durable_mp.core.vocabulary import SubType
from durable_mp.engine.result_decode import COMPACT_ITEM, UNREAD, success_value
from durable_mp.lambda_service import ErrorObject
from durable_mp.rerun import CODE_KEY
from durable_mp.store.facade import ExecutionRecord, Store

HANDLER_MARK = "durable_mp.map["  # in a map execution's handler name
CODES_KEY = "map_codes"  # ExecutionRecord.extra: [(run, code, items done before it)] once the code changed
STORED_RESULT = "durable_mp.map: the results are in the item records"


@dataclass
class Plan:
    """What one map execution computes itself and what it takes from others (its stored input)."""

    computation: bytes  # digest of function identity + name
    keys: bytes  # DIGEST_BYTES per item, in input order
    run: list[int]  # input indices its own context.map runs, in batch order
    reuse: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # source exec -> (input index, batch index)

    def key(self, index: int) -> bytes:
        return self.keys[index * DIGEST_BYTES:(index + 1) * DIGEST_BYTES]

    @property
    def total(self) -> int:
        return len(self.keys) // DIGEST_BYTES

    @property
    def reused(self) -> int:
        return sum(len(pairs) for pairs in self.reuse.values())


def is_map_execution(rec: ExecutionRecord) -> bool:
    return HANDLER_MARK in (rec.handler or "")


def plan_of(rec: ExecutionRecord) -> Plan | None:
    """The plan a map execution was created with (None for other executions and old map records)."""
    if not is_map_execution(rec) or rec.input is None:
        return None
    try:
        plan = pickle.loads(rec.input)
    except Exception:  # noqa: BLE001 - a record written by another version: not reusable
        return None
    return plan if isinstance(plan, Plan) else None


def batch_op_id(store: Store, exec_id: str) -> str | None:
    """The op id of the map execution's ``context.map`` (None before it started)."""
    for rec in store.children(exec_id, ""):
        if rec.sub_type == SubType.MAP:
            return rec.op_id
    return None


def outcomes(store: Store, exec_id: str) -> tuple[set[int], dict[int, Any]]:
    """``(succeeded batch indices, {batch index: record} of the other ended items)`` of a map execution."""
    op_id = batch_op_id(store, exec_id)
    if op_id is None:
        return set(), {}
    plain, others = store.branch_outcomes(exec_id, op_id, COMPACT_ITEM)
    ended, ok, _unfinished = split_terminal(others)
    done = set(plain) | {i for i, good in ok.items() if good}
    return done, {i: rec for i, rec in ended.items() if not ok[i]}


def find_reusable(store: Store, plan: Plan, code: str, exclude: str) -> dict[str, list[tuple[int, int]]]:
    """For the items of ``plan``: other executions holding their results for the same computation and code."""
    candidates = []
    for rec in reversed(store.list_executions()):  # newest first
        if rec.exec_id == exclude or (rec.extra or {}).get(CODE_KEY) != code:
            continue
        other = plan_of(rec)
        if other is not None and other.computation == plan.computation:
            candidates.append((rec, other))
    found: dict[str, list[tuple[int, int]]] = {}
    if not candidates:  # the usual first run: no index of the keys to build
        return found
    keys = _split(plan.keys)
    first = dict(zip(keys, range(len(keys)), strict=True))
    repeated: dict[bytes, list[int]] = {}
    if len(first) != len(keys):  # an item given twice: each place gets the result
        for index, key in enumerate(keys):
            repeated.setdefault(key, []).append(index)
    for rec, other in candidates:
        if not first:
            break
        done, _failed = outcomes(store, rec.exec_id)
        theirs, run = _split(other.keys), other.run
        pairs: list[tuple[int, int]] = []
        for batch_index in sorted(done):
            if batch_index < len(run):
                key = theirs[run[batch_index]]
                place = first.pop(key, None)
                if place is None:
                    continue
                if repeated:
                    pairs.extend((i, batch_index) for i in repeated[key])
                else:
                    pairs.append((place, batch_index))
        if pairs:
            found[rec.exec_id] = pairs
    return found


def _split(keys: bytes) -> list[bytes]:
    return [keys[i:i + DIGEST_BYTES] for i in range(0, len(keys), DIGEST_BYTES)]


def _decode(data: Any, where: str) -> tuple[bool, Any]:
    """``(succeeded, value or ErrorObject)`` of one stored item record."""
    if data.__class__ is bytes and data[0] == COMPACT_ITEM:  # a plain success, the usual record
        value = success_value(data)
        if value is not UNREAD:
            return True, value
    if item_status(data) == OpStatus.SUCCEEDED:
        value = success_value(data)
        if value is not UNREAD:
            return True, value
    rec = data if isinstance(data, OpRecord) else OpRecord.loads(data)
    if rec.status != OpStatus.SUCCEEDED:
        return False, ErrorObject.from_dict(rec.error or {})
    return True, None if rec.result is None else _serdes.deserialize(None, rec.result, what=where)


class MissingResults(LookupError):
    """An execution the results refer to lost items (deleted since): they must be computed again."""


def read_items(store: Store, exec_id: str, batch_indices: list[int]) -> list[tuple[bool, Any]]:
    """The outcomes of items of a map execution's batch, in the order asked."""
    if not batch_indices:
        return []
    op_id = batch_op_id(store, exec_id)
    raw = store.branch_raw(exec_id, op_id) if op_id is not None else {}
    out = []
    for index in batch_indices:
        data = raw.get(index)
        if data is None:
            raise MissingResults(f"item {index} of execution {exec_id!r} is not in the store")
        out.append(_decode(data, f"item {index} of {exec_id}"))
    return out


def describe(store: Store, rec: ExecutionRecord) -> list[str]:
    """Lines for ``durable-mp show``: where a map's items came from and which code computed them."""
    plan = plan_of(rec)
    if plan is None:
        return []
    parts = [f"{len(plan.run)} computed here"]
    parts += [f"{len(pairs)} reused from {source}" for source, pairs in plan.reuse.items()]
    lines = [f"durable_mp.map: {plan.total} items: {', '.join(parts)}"]
    extra = rec.extra or {}
    history = extra.get(CODES_KEY)
    if history:
        runs = [f"run {run}: code {code}" + (f" (the fix; {done} items finished before it were kept)" if done else "")
                for run, code, done in history]
        lines.append("durable_mp.map code: " + "; ".join(runs))
    elif extra.get(CODE_KEY):
        lines.append(f"durable_mp.map code: {extra[CODE_KEY]} (of the items computed here)")
    return lines


__all__ = ["CODES_KEY", "HANDLER_MARK", "MissingResults", "Plan", "STORED_RESULT", "describe", "find_reusable",
           "outcomes", "plan_of", "read_items"]
