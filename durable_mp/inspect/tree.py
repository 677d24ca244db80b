"""The operation tree of one execution, rebuilt from its checkpoint records.

Records only know their parent (``parent_id``, ``""`` at the root).  ``OpTree`` indexes
them once so ``show``, ``history`` and ``report`` can walk the tree in a stable order:
branches of a parallel/map by input index (their ids are ``operation_id(batch, index)``),
every other operation by start time.

A record whose parent is missing is still shown where it belongs.  The usual case: a
driver killed mid-map leaves steps of items in flight, whose own item record is written
only when the item ends.  Such an item gets a placeholder (``is_placeholder``) under its
batch, found from the item id (``operation_id(batch, index)``); a parent no batch
explains gets a placeholder at the root.  So nothing recorded is hidden, and no step of
an item is shown as if the handler had run it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

from durable_mp.core.callback_ids import encode_callback_id
from durable_mp.core.nesting import is_flat
from durable_mp.core.records import OpRecord, OpStatus, OpType, operation_id
from durable_mp.core.remote import origin_note
from durable_mp.core.vocabulary import BATCH_SUB_TYPES, BRANCH_SUB_TYPES, SubType, default_item_name
from durable_mp.inspect.crash_model import CrashFacts
from durable_mp.store.records import RUNNING, ExecutionRecord, display_status, owner_alive

WORKER_CRASHED = "WorkerCrashedError"
INDEX_SEARCH_SLACK = 1024  # ids tried past the known item count of a batch still running
LIVE = float("inf")  # OpTree.open_end of an execution whose driver runs: now, read at each call
PLACEHOLDER = "unrecorded"  # extra key of a parent made up for records whose parent was never committed


def is_batch(rec: OpRecord) -> bool:
    return rec.op_type == OpType.CONTEXT and rec.sub_type in BATCH_SUB_TYPES


def is_branch(rec: OpRecord) -> bool:
    return rec.op_type == OpType.CONTEXT and rec.sub_type in BRANCH_SUB_TYPES


def error_type(error: dict | None) -> str:
    """The short class name of a checkpointed error (``module.Qual`` -> ``Qual``)."""
    if not error:
        return ""
    return str(error.get("ErrorType") or "").rsplit(".", 1)[-1]


def error_line(error: dict | None, limit: int = 200) -> str:
    """``Type: message (raised as X at file:line in f)`` on one line, cut to ``limit`` characters."""
    if not error:
        return ""
    message = " ".join(str(error.get("ErrorMessage") or "").split())
    text = f"{error_type(error) or 'Error'}: {message}" if message else (error_type(error) or "Error")
    note = origin_note(error.get("ErrorType"), error.get("StackTrace"), message)  # the user's line, from the traceback
    room = max(limit - len(note), limit // 2)
    text = text if len(text) <= room else text[: room - 1] + "…"
    return (text + note)[:limit]


def callback_id_of(exec_id: str, rec: OpRecord) -> str:
    """The id ``send_callback_success`` / ``durable-mp callback`` take for a callback record."""
    return encode_callback_id(exec_id, rec.parent_id, rec.op_id)


def waiting_callbacks(exec_id: str, ops: list[OpRecord]) -> list[dict]:
    """``{"id", "name", "operation_id"}`` of every callback still waiting for its sender."""
    return [{"id": callback_id_of(exec_id, r), "name": r.name, "operation_id": r.op_id}
            for r in ops if r.op_type == OpType.CALLBACK and r.status == OpStatus.STARTED]


def last_activity(rec: OpRecord) -> float:
    """The latest time ``rec`` records: its end, or its last attempt's start or end."""
    times = [rec.start_ts] + [t for a in rec.attempts for t in (a.start_ts, a.end_ts) if t is not None]
    return max(times + ([rec.end_ts] if rec.end_ts is not None else []))


def is_placeholder(rec: OpRecord) -> bool:
    """A parent the store never got (``OpTree`` made it up for the records under it)."""
    return bool((rec.extra or {}).get(PLACEHOLDER))


def _placeholders(ops: dict[str, OpRecord]) -> list[OpRecord]:
    """Stand-ins for the parents of ``ops`` that are missing: branches of their batch where the id says so."""
    under: dict[str, list[OpRecord]] = {}
    for rec in ops.values():
        if rec.parent_id and rec.parent_id not in ops:
            under.setdefault(rec.parent_id, []).append(rec)
    if not under:
        return []
    found: dict[str, tuple[OpRecord, int]] = {}  # missing id -> (its batch, its index)
    for batch in ops.values():
        if not is_batch(batch) or len(found) == len(under):
            continue
        total = int((batch.extra or {}).get("total") or 0)
        for i in range(total + (0 if batch.is_terminal else INDEX_SEARCH_SLACK)):
            oid = operation_id(batch.op_id, i)
            if oid in under:
                found[oid] = (batch, i)
    out = []
    for missing, children in under.items():
        start = min(c.start_ts for c in children)
        pids = [a.pid for c in children for a in c.attempts if a.pid] + [c.pid for c in children if c.pid]
        if missing in found:
            batch, i = found[missing]
            parallel = batch.sub_type == SubType.PARALLEL
            out.append(OpRecord(missing, batch.op_id, OpType.CONTEXT,
                                SubType.PARALLEL_BRANCH if parallel else SubType.MAP_ITERATION,
                                default_item_name(i, parallel=parallel), OpStatus.STARTED, start,
                                pid=pids[-1] if pids else 0, extra={PLACEHOLDER: True}))
        else:
            out.append(OpRecord(missing, "", OpType.CONTEXT, SubType.RUN_IN_CHILD_CONTEXT, None, OpStatus.STARTED,
                                start, extra={PLACEHOLDER: True}))
    return out


def is_crash(error: dict | None) -> bool:
    return error_type(error) == WORKER_CRASHED


class OpTree:
    """Records of one execution indexed by id and by parent."""

    def __init__(self, execution: ExecutionRecord, ops: list[OpRecord]) -> None:
        self.execution = execution
        self.ops: dict[str, OpRecord] = {r.op_id: r for r in ops}
        for rec in _placeholders(self.ops):
            self.ops[rec.op_id] = rec
        ops = list(self.ops.values())
        by_parent: dict[str, list[OpRecord]] = {}
        for rec in ops:
            parent = rec.parent_id if rec.parent_id in self.ops else ""
            by_parent.setdefault(parent, []).append(rec)
        self.index: dict[str, int] = {}  # branch op id -> input index
        self._open_end: float | None = None
        self._children: dict[str, list[OpRecord]] = {}
        for parent, recs in by_parent.items():
            self._children[parent] = self._ordered(parent, recs)

    def _ordered(self, parent: str, recs: list[OpRecord]) -> list[OpRecord]:
        owner = self.ops.get(parent)
        branches = [r for r in recs if is_branch(r)] if owner is not None and is_batch(owner) else []
        if owner is not None and branches:
            total = max(int((owner.extra or {}).get("total") or 0), len(branches))
            wanted = {r.op_id for r in branches}
            limit = total + (0 if owner.is_terminal else INDEX_SEARCH_SLACK)
            for i in range(limit):
                oid = operation_id(parent, i)
                if oid in wanted:
                    self.index[oid] = i
                    wanted.discard(oid)
                    if not wanted:
                        break
        big = float("inf")
        return sorted(recs, key=lambda r: (self.index.get(r.op_id, big), r.start_ts, r.op_id))

    def children(self, op_id: str) -> list[OpRecord]:
        return self._children.get(op_id, [])

    def is_virtual(self, rec: OpRecord) -> bool:
        """An item row of a FLAT batch: the engine's outcome of a branch that is no operation (``core.nesting``)."""
        if not is_branch(rec):
            return False
        owner = self.ops.get(rec.parent_id)
        return owner is not None and is_flat(owner.extra)

    def walk(self, op_id: str = "", depth: int = 0) -> Iterator[tuple[OpRecord, int]]:
        """Every record under ``op_id`` depth first, with its depth (root children: 0)."""
        for rec in self.children(op_id):
            yield rec, depth
            yield from self.walk(rec.op_id, depth + 1)

    def ancestors(self, rec: OpRecord) -> Iterator[OpRecord]:
        seen = set()
        parent = self.ops.get(rec.parent_id)
        while parent is not None and parent.op_id not in seen:
            seen.add(parent.op_id)
            yield parent
            parent = self.ops.get(parent.parent_id)

    def branch_of(self, rec: OpRecord) -> OpRecord | None:
        """The nearest enclosing parallel branch / map item, if any."""
        return next((a for a in self.ancestors(rec) if is_branch(a)), None)

    def end_of(self, rec: OpRecord) -> float:
        """When ``rec`` ended; for an unfinished one, when its enclosing work ended (``open_end``)."""
        if rec.end_ts is not None:
            return rec.end_ts
        for parent in self.ancestors(rec):
            if parent.end_ts is not None:
                return parent.end_ts
        return self.open_end()

    def open_end(self) -> float:
        """Where unfinished work ends: the execution's end; while RUNNING, now if its driver
        lives, else the last record of the stopped run (nothing ran after it)."""
        ex = self.execution
        if self._open_end is None:
            if ex.ended_ts is not None:
                self._open_end = ex.ended_ts
            elif owner_alive(ex):
                self._open_end = LIVE
            else:
                self._open_end = max([ex.started_ts] + [last_activity(r) for r in self.ops.values()])
        return max(time.time(), ex.started_ts) if self._open_end is LIVE else self._open_end

    def recorded(self) -> list[OpRecord]:
        """The records the store holds (no placeholder)."""
        return [r for r in self.ops.values() if not is_placeholder(r)]

    def counts(self) -> Counter:
        return Counter(r.status for r in self.recorded())

    def done_total(self) -> tuple[int, int]:
        recorded = self.recorded()
        done = sum(1 for r in recorded if r.status in (OpStatus.SUCCEEDED, OpStatus.FAILED))
        return done, len(recorded)


# -- text rendering (``durable-mp show``) ---------------------------------------------------

def _duration(rec: OpRecord, tree: OpTree) -> str:
    if rec.end_ts is not None:
        return f"{rec.end_ts - rec.start_ts:.3f}s"
    ex = tree.execution
    if ex.status != RUNNING:
        return "never finished"
    if not owner_alive(ex):
        return "interrupted (no driver; resume the execution)"
    return f"running for {max(0.0, time.time() - rec.start_ts):.1f}s"


def _crash_text(rec: OpRecord, facts: CrashFacts | None) -> str:
    """What crashed under a branch and what followed, from the facts every view shares."""
    if facts is None or not is_branch(rec):
        return ""
    deaths = [d for d in facts.deaths if d.op_id == rec.op_id]
    notes = []
    if deaths:
        pids = ", ".join(str(d.pid) for d in deaths)
        kinds = sorted({d.kind for d in deaths})
        notes.append(f"{len(deaths)} worker death(s) ({'/'.join(kinds)}; pid {pids})")
    if rec.op_id in facts.reran_after_resume:
        notes.append("started before a resume, re-ran after it")
    elif rec.op_id in facts.redispatched:
        notes.append("re-dispatched")
    return ("  ⚠ " + "; ".join(notes)) if notes else ""


def _node_text(rec: OpRecord, tree: OpTree, facts: CrashFacts | None = None) -> str:
    index = tree.index.get(rec.op_id)
    parts = [f"[{index}] " if index is not None else "", rec.sub_type, " ", rec.name or "-"]
    line = "".join(parts) + f"  {rec.status}  {_duration(rec, tree)}"
    extra = rec.extra or {}
    if is_batch(rec) and "completion_reason" in extra:
        line += f"  {extra['completion_reason']} ({extra.get('reported', '?')} of {extra.get('total', '?')} reported)"
    if is_branch(rec) and rec.pid:
        line += f"  pid {rec.pid}"
    if is_placeholder(rec):
        line += "  (its own record was never committed: in flight when its driver stopped)"
    line += _crash_text(rec, facts)
    if rec.op_type == OpType.CALLBACK:
        # what an outside system needs to complete it (durable-mp callback ID --success ...)
        line += f"  callback id {callback_id_of(tree.execution.exec_id, rec)}"
    if rec.op_type == OpType.STEP:
        n = max(rec.attempt, len(rec.attempts))
        line += f"  {n} attempt{'s' if n != 1 else ''}"
        retried = [a for a in rec.attempts if a.error is not None]
        if rec.status == OpStatus.FAILED and retried:
            retried = retried[:-1]
        if retried:
            line += f" ({len(retried)} retried: {error_line(retried[-1].error, 80)})"
        if rec.status == OpStatus.PENDING and rec.next_attempt_ts:
            line += f", next attempt at {time.strftime('%H:%M:%S', time.localtime(rec.next_attempt_ts))}"
    return line


def _select(children: list[OpRecord], limit: int | None,
            flagged: frozenset[str] = frozenset()) -> tuple[list[int], int]:
    """Indices of the children to show: first/last ``limit // 2`` plus unusual ones."""
    n = len(children)
    if limit is None or n <= limit:
        return list(range(n)), 0
    half = max(1, limit // 2)
    keep = set(range(half)) | set(range(max(half, n - half), n))
    unusual = [i for i in range(half, n - half)
               if children[i].status != OpStatus.SUCCEEDED or children[i].op_id in flagged]
    keep.update(unusual[:limit])
    return sorted(keep), n - len(keep)


def _gap_text(hidden: list[OpRecord]) -> str:
    counts = Counter(r.status for r in hidden)
    return f"… {len(hidden)} more: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def render_tree(tree: OpTree, limit: int | None = 10, facts: CrashFacts | None = None) -> str:
    """The operation tree as indented text, with large batches summarized.

    ``facts`` (``inspect.runs.crash_facts``) adds what crashed and ran again, counted as
    ``report`` and ``history`` count it.
    """
    ex = tree.execution
    end = tree.open_end()
    done, total = tree.done_total()
    lines = [f"execution {ex.exec_id}  {display_status(ex)}  {ex.handler}  runs {ex.runs}  {end - ex.created_ts:.3f}s  "
             f"{done}/{total} operations finished"]
    if ex.error:
        lines.append(f"  error: {error_line(ex.error, 400)}")
    flagged: frozenset[str] = frozenset()
    if facts is not None:
        flagged = frozenset(facts.redispatched | {d.op_id for d in facts.deaths})
        if facts.sentence():
            lines.append(f"  crashes and runs: {facts.sentence()}")
        for run in facts.runs:
            if not run.finished and not run.running:
                lines.append(f"  run {run.number}: driver stopped (killed or interrupted) after "
                             f"{time.strftime('%H:%M:%S', time.localtime(run.end))}")

    def emit(op_id: str, prefix: str) -> None:
        children = tree.children(op_id)
        shown, _hidden = _select(children, limit, flagged)
        entries: list[OpRecord | list[OpRecord]] = []  # a node, or a gap of hidden siblings
        prev = -1
        for i in shown:
            if i != prev + 1:
                entries.append(children[prev + 1:i])
            entries.append(children[i])
            prev = i
        if prev != len(children) - 1:
            entries.append(children[prev + 1:])
        for k, item in enumerate(entries):
            last = k == len(entries) - 1
            branch, cont = ("└─ ", "   ") if last else ("├─ ", "│  ")
            if isinstance(item, list):
                lines.append(prefix + branch + _gap_text(item))
                continue
            lines.append(prefix + branch + _node_text(item, tree, facts))
            if item.status == OpStatus.FAILED and item.error:
                lines.append(prefix + cont + "   error: " + error_line(item.error, 300))
            emit(item.op_id, prefix + cont)

    emit("", "")
    return "\n".join(lines)
