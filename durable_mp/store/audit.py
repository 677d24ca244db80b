"""Check an execution's stored records against the engine's invariants (DESIGN.md §3).

The store refuses single bad writes (``forward``); this reads a whole execution and
reports what no single write can show: a record whose parent is missing, an id that
the deterministic derivation does not give, unfinished work under a finished parent,
a SUCCEEDED execution with unfinished operations, a terminal record without its outcome.
The chaos test runs it after every round and every driver death; ``durable-mp check ID``
prints it.

Every allowed exception is a named rule (``ALLOWED``), each saying where DESIGN.md or
the engine makes it legitimate, so a reader sees exactly what is tolerated and why.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import NamedTuple, Protocol

from durable_mp.core.completion import CompletionReason
from durable_mp.core.nesting import is_flat
from durable_mp.core.records import OpRecord, OpStatus, OpType, operation_id
from durable_mp.store.records import SUCCEEDED

BATCH_SUB_TYPES = frozenset({"Parallel", "Map"})
BRANCH_SUB_TYPES = frozenset({"ParallelBranch", "MapIteration"})
# how far past a running batch's known items a missing parent is looked for among its items' ids
# (the items the pool runs at once: chunks of up to engine.scheduling.MAX_CHUNK_ITEMS per worker)
ITEM_SEARCH = 2**18
# how many missing ids in a row the id derivation looks past (an operation counted but not recorded)
ID_GAP_SLACK = 8
VIRTUAL_DEPTH = 4  # virtual child contexts nested in one another, at most, that ids are derived through
# completions reached by successes: the branches still running are terminated and stay STARTED (DESIGN.md §1)
BY_SUCCESSES = frozenset({CompletionReason.MIN_SUCCESSFUL_REACHED.value,
                          CompletionReason.CUSTOM_COMPLETION_SUCCEEDED.value})
# a branch the driver failed because its worker ended: what the branch was doing stays unfinished (DESIGN.md §4)
ENDED_BY_DRIVER = frozenset({"WorkerCrashedError", "StepTimeoutError", "MemoryLimitExceededError"})

# The named exceptions: a rule name -> why the state it allows is legitimate.
EARLY_COMPLETION_BY_SUCCESS = "early-completion-by-success"
UNAWAITED_CALLBACK = "unawaited-callback"
BRANCH_ENDED_BY_DRIVER = "branch-ended-by-driver"
ITEM_RECORDED_AT_ITS_END = "item-recorded-at-its-end"
WAIT_HAS_NO_VALUE = "wait-has-no-value"
BATCH_RESULT_IN_ITEMS = "batch-result-in-items"
ALLOWED = {
    EARLY_COMPLETION_BY_SUCCESS: "a batch completed by successes (min_successful, first_successful, a custom "
                                 "predicate) terminates its running branches and records them STARTED under the "
                                 "finished batch (DESIGN.md §1); a FLAT branch's operations sit under the batch",
    UNAWAITED_CALLBACK: "create_callback returns before the callback completes: a callback nobody waited for "
                        "stays STARTED under a finished parent",
    BRANCH_ENDED_BY_DRIVER: "a branch the driver failed because its worker died, timed out or ran out of memory "
                            "(DESIGN.md §4) keeps the records of what it was doing when it ended",
    ITEM_RECORDED_AT_ITS_END: "a parallel branch or map item run by the pool writes its record when it ends (a "
                              "million-item map writes one record per item); until then, its batch unfinished, its "
                              "operations sit under its id with no record",
    WAIT_HAS_NO_VALUE: "a SUCCEEDED wait has no result",
    BATCH_RESULT_IN_ITEMS: "a SUCCEEDED parallel/map keeps its outcome in its item records, not a result",
}

# Violations, by rule.
ORPHAN = "orphan"
ID_NOT_DERIVED = "id-not-derived"
UNFINISHED_UNDER_TERMINAL = "unfinished-under-terminal"
UNFINISHED_IN_SUCCEEDED_EXECUTION = "unfinished-in-succeeded-execution"
NO_OUTCOME = "terminal-without-outcome"


class Violation(NamedTuple):
    """One broken invariant: which rule, which operation, and what was found."""

    rule: str
    op_id: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.op_id}: {self.detail}"


class Readable(Protocol):
    """What the audit reads of a store (``Store`` has it; a test may hand in anything alike)."""

    def get_execution(self, exec_id: str) -> object | None: ...
    def ops(self, exec_id: str) -> list[OpRecord]: ...
    def branch_records(self, exec_id: str, batch_op_id: str) -> dict[int, OpRecord]: ...


def audit(store: Readable, exec_id: str) -> list[Violation]:
    """Every invariant the stored records of ``exec_id`` break; empty when they hold."""
    execution = store.get_execution(exec_id)
    records = store.ops(exec_id)
    by_id = {rec.op_id: rec for rec in records}
    rows: dict[str, dict[int, OpRecord]] = {
        rec.op_id: store.branch_records(exec_id, rec.op_id) for rec in records if is_batch(rec)}
    status = getattr(execution, "status", None)
    return check_records(records, rows, by_id, execution_succeeded=status == SUCCEEDED)


def check_records(records: Iterable[OpRecord], rows: dict[str, dict[int, OpRecord]], by_id: dict[str, OpRecord],
                  *, execution_succeeded: bool) -> list[Violation]:
    """The checks of ``audit`` on records already read: ``rows`` holds each batch's item records by index."""
    records = list(records)
    found: list[Violation] = []
    branch_of = _check_ids(records, rows, by_id, found)
    running_items = _running_items({rec.parent_id for rec in records if rec.parent_id and rec.parent_id not in by_id},
                                   rows, by_id)
    for rec in records:
        parent = by_id.get(rec.parent_id) if rec.parent_id else None
        if rec.parent_id and parent is None and rec.parent_id not in running_items:  # ITEM_RECORDED_AT_ITS_END
            found.append(Violation(ORPHAN, rec.op_id, f"{_label(rec)}: parent {rec.parent_id} has no record"))
        if not rec.is_terminal:
            if parent is not None and parent.is_terminal and not _may_stay_unfinished(rec, parent, rows, branch_of):
                found.append(Violation(UNFINISHED_UNDER_TERMINAL, rec.op_id,
                                       f"{_label(rec)} is {rec.status} under {_label(parent)} {parent.status}"))
            if not rec.parent_id and execution_succeeded and rec.op_type != OpType.CALLBACK:
                found.append(Violation(UNFINISHED_IN_SUCCEEDED_EXECUTION, rec.op_id,
                                       f"{_label(rec)} is {rec.status} in a SUCCEEDED execution"))
        else:
            missing = _missing_outcome(rec)
            if missing:
                found.append(Violation(NO_OUTCOME, rec.op_id, f"{_label(rec)} is {rec.status} {missing}"))
    return found


def is_batch(rec: OpRecord) -> bool:
    return rec.op_type == OpType.CONTEXT and rec.sub_type in BATCH_SUB_TYPES


def _label(rec: OpRecord) -> str:
    return f"{rec.sub_type or rec.op_type} {rec.name!r}"


def _may_stay_unfinished(rec: OpRecord, parent: OpRecord, rows: dict[str, dict[int, OpRecord]],
                         branch_of: dict[str, int]) -> bool:
    """Whether an unfinished record under a terminal parent falls under a named exception (``ALLOWED``)."""
    if rec.op_type == OpType.CALLBACK:
        return True  # UNAWAITED_CALLBACK
    if parent.sub_type in BRANCH_SUB_TYPES and parent.status == OpStatus.FAILED:
        error_type = str((parent.error or {}).get("ErrorType", ""))
        if error_type.rsplit(".", 1)[-1] in ENDED_BY_DRIVER:
            return True  # BRANCH_ENDED_BY_DRIVER
    if is_batch(parent) and (parent.extra or {}).get("completion_reason") in BY_SUCCESSES:
        index = branch_of.get(rec.op_id)
        if index is None:
            return False
        row = rows.get(parent.op_id, {}).get(index)
        # EARLY_COMPLETION_BY_SUCCESS: the branch itself, or (FLAT) an operation of a branch left STARTED
        return row is not None and row.status == OpStatus.STARTED
    return False


def _missing_outcome(rec: OpRecord) -> str | None:
    if rec.status == OpStatus.SUCCEEDED:
        if rec.result is not None or rec.op_type == OpType.WAIT:  # WAIT_HAS_NO_VALUE
            return None
        if is_batch(rec) and "completion_reason" in (rec.extra or {}):  # BATCH_RESULT_IN_ITEMS
            return None
        return "without a result"
    if rec.error is None:
        return "without an error"
    return None


def _check_ids(records: list[OpRecord], rows: dict[str, dict[int, OpRecord]], by_id: dict[str, OpRecord],
               found: list[Violation]) -> dict[str, int]:
    """Flag ids the derivation does not give; return the branch index of every item row and FLAT operation.

    An item row of batch ``b`` at index ``i`` is ``operation_id(b, i)``.  Any other record
    under parent ``p`` is ``operation_id(p, n)`` for a counter ``n`` from 1, possibly through
    virtual child contexts that record nothing themselves; under a FLAT batch ``p`` is
    replaced by the branch's own id, ``operation_id(b, i)``.
    """
    branch_of: dict[str, int] = {}
    in_rows: set[int] = set()
    _index_keyed_by_id(records, rows, by_id)
    for batch_id, items in rows.items():
        for index, row in items.items():
            in_rows.add(id(row))
            branch_of[row.op_id] = index
            if row.op_id != operation_id(batch_id, index):
                found.append(Violation(ID_NOT_DERIVED, row.op_id,
                                       f"{_label(row)} at index {index} of batch {batch_id}: expected "
                                       f"{operation_id(batch_id, index)}"))
    wanted: dict[str, set[str]] = defaultdict(set)
    for rec in records:
        if id(rec) not in in_rows and rec.op_id not in branch_of:
            wanted[rec.parent_id].add(rec.op_id)
    for parent_id, ids in wanted.items():
        parent = by_id.get(parent_id)
        if parent is not None and is_batch(parent) and is_flat(parent.extra):
            items = rows.get(parent_id, {})
            total = int((parent.extra or {}).get("total") or 0)
            limit = max([total, *(i + 1 for i in items)]) + (0 if parent.is_terminal else ID_GAP_SLACK)
            for index in range(limit):
                for op_id in _derive(operation_id(parent_id, index), ids, VIRTUAL_DEPTH):
                    branch_of[op_id] = index
                if not ids:
                    break
        else:
            _derive(parent_id, ids, VIRTUAL_DEPTH)
        for op_id in sorted(ids):
            rec = by_id[op_id]
            found.append(Violation(ID_NOT_DERIVED, op_id, f"{_label(rec)} is no operation of parent "
                                                          f"{parent_id or '(root)'} by the id derivation"))
    return branch_of


def _running_items(missing: set[str], rows: dict[str, dict[int, OpRecord]], by_id: dict[str, OpRecord]) -> set[str]:
    """The missing parents that are items of an unfinished batch (``ITEM_RECORDED_AT_ITS_END``)."""
    found: set[str] = set()
    for batch_id, rec in by_id.items():
        if not missing or not is_batch(rec) or rec.is_terminal:
            continue
        items = rows.get(batch_id, {})
        limit = max([int((rec.extra or {}).get("total") or 0), *(i + 1 for i in items)]) + ITEM_SEARCH
        for index in range(limit):
            op_id = operation_id(batch_id, index)
            if op_id in missing:
                missing.discard(op_id)
                found.add(op_id)
                if not missing:
                    break
    return found


def _index_keyed_by_id(records: list[OpRecord], rows: dict[str, dict[int, OpRecord]],
                       by_id: dict[str, OpRecord]) -> None:
    """Add to ``rows`` the item records kept under their op id instead of their index.

    A batch inside a branch runs on the worker's threads, and its items reach the store
    keyed like any operation; their index is found by the id derivation (an item whose id
    no index gives stays out, and is reported as any other record under the batch).
    """
    keyed = {id(row) for items in rows.values() for row in items.values()}
    loose: dict[str, set[str]] = defaultdict(set)
    for rec in records:
        parent = by_id.get(rec.parent_id)
        if rec.sub_type in BRANCH_SUB_TYPES and id(rec) not in keyed and parent is not None and is_batch(parent):
            loose[rec.parent_id].add(rec.op_id)
    for batch_id, ids in loose.items():
        items = rows.setdefault(batch_id, {})
        total = int((by_id[batch_id].extra or {}).get("total") or 0)
        for index in range(max(total, len(ids) + len(items)) + ID_GAP_SLACK):
            op_id = operation_id(batch_id, index)
            if op_id in ids:
                ids.discard(op_id)
                items.setdefault(index, by_id[op_id])
            if not ids:
                break


def _derive(prefix: str, wanted: set[str], depth: int) -> list[str]:
    """Remove from ``wanted`` (and return) the ids a context with id ``prefix`` gives its operations.

    Counters run from 1; up to ``ID_GAP_SLACK`` missing ids in a row are looked past.  A
    missing id whose own first operation is wanted is a virtual child context: its
    operations are derived from it in turn.
    """
    got: list[str] = []
    gap = 0
    n = 1
    while wanted and gap <= ID_GAP_SLACK:
        op_id = operation_id(prefix, n)
        if op_id in wanted:
            wanted.discard(op_id)
            got.append(op_id)
            gap = 0
        elif depth > 0 and _is_virtual(op_id, wanted, depth):
            got += _derive(op_id, wanted, depth - 1)
            gap = 0
        else:
            gap += 1
        n += 1
    return got


def _is_virtual(op_id: str, wanted: set[str], depth: int) -> bool:
    first = operation_id(op_id, 1)
    return first in wanted or (depth > 1 and _is_virtual(first, wanted, depth - 1))


__all__ = ["ALLOWED", "Violation", "audit", "check_records"]
