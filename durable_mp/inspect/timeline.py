"""Where and when work ran: the bars of the report's Gantt chart, derived from the records.

One row per process.  Every parallel branch / map item is a bar in the row of the worker
that ran it (``OpRecord.pid``); every step attempt is a bar in the row of the process
that ran it (``Attempt.pid``).  Operations of the handler body (batches, waits, steps
outside any branch) run in the driver and share one "driver" row.

Crashes leave two kinds of traces, and both are marked:

* a branch that failed with ``WorkerCrashedError`` (its worker died too often);
* a branch that was **re-dispatched**: steps under it were run by other processes than
  the one that finished it, because the first worker died (or the whole driver was
  killed and the execution resumed).  The last sign of life in the dead worker's row
  gets a marker: a crash marker for a recorded death, a stop marker otherwise (the
  worker stopped with its driver), so the crash markers drawn are the crashes counted.

A worker that died before streaming any record of a branch leaves no trace in the store;
the dispatcher only logs such a crash.

Counts come from ``inspect.runs.crash_facts``, the derivation ``show`` and ``history`` use
too.  Driver runs are drawn: the time between a stopped driver's last record and the next
run's start is a gap (``Timeline.gaps``), and bars of the driver row are cut there.
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from durable_mp.core.records import OpRecord, OpStatus, OpType
from durable_mp.inspect.runs import CrashFacts, DriverRun, crash_facts
from durable_mp.inspect.tree import OpTree, error_line, error_type, is_batch, is_branch, is_crash
from durable_mp.store.records import ExecutionRecord, display_status

DRIVER = "driver"
NO_WORKER = "none"
KILL_TYPES = frozenset({"WorkerCrashedError", "MemoryLimitExceededError", "StepTimeoutError"})
MAX_BARS = 20000  # beyond this the chart keeps every unusual bar and a sample of the others
_PID_IN_MESSAGE = re.compile(r"\bpid (\d+)")


@dataclass
class Bar:
    kind: str  # branch | attempt | context | wait | step
    op_id: str
    name: str
    status: str  # succeeded | failed | started | retried | pending
    row: object  # pid (int), DRIVER or NO_WORKER
    start: float
    end: float
    attempt: int | None = None
    error: str = ""
    crash: str = ""  # error type of a worker death / kill, else ""
    redispatched: bool = False
    parent: str = ""  # op id of the enclosing branch (attempt bars)
    lane: int = 0

    @property
    def container(self) -> bool:
        return self.kind in ("branch", "context")


CRASH = "crash"  # a marker for a worker death or kill: one per ``CrashFacts.deaths``
STOPPED = "stopped"  # a marker for a driver that stopped, and for its workers that stopped with it


@dataclass
class Marker:
    row: object
    ts: float
    text: str
    op_id: str
    kind: str = CRASH  # CRASH | STOPPED


@dataclass
class Timeline:
    bars: list[Bar]
    markers: list[Marker]
    rows: list[object]
    lanes: dict[object, int]
    start: float
    end: float
    summary: dict = field(default_factory=dict)
    hidden: int = 0
    execution: ExecutionRecord | None = None
    runs: list[DriverRun] = field(default_factory=list)
    gaps: list[tuple[float, float]] = field(default_factory=list)  # no driver between a stop and a resume


def _status(rec_status: str) -> str:
    return {OpStatus.SUCCEEDED: "succeeded", OpStatus.FAILED: "failed",
            OpStatus.PENDING: "pending"}.get(rec_status, "started")


def _branch_row(rec: OpRecord) -> object:
    if rec.pid:
        return rec.pid
    if is_crash(rec.error):
        pids = _PID_IN_MESSAGE.findall(str((rec.error or {}).get("ErrorMessage", "")))
        if pids:
            return int(pids[-1])
    return NO_WORKER


RowOf = Callable[[int | None], object]  # an attempt's pid -> its bar's row


def _worker_or(row: object) -> RowOf:
    """Row of an attempt: the worker that ran it, else ``row``."""
    return lambda pid: pid or row


def _step_row(branch: OpRecord | None) -> RowOf:
    """Row of a step attempt: the driver for the handler body, else the worker that ran it."""
    if branch is None:
        return lambda _pid: DRIVER
    return _worker_or(branch.pid or NO_WORKER)


def _attempt_bars(tree: OpTree, rec: OpRecord, row_of: RowOf) -> list[Bar]:
    bars = []
    attempts = list(rec.attempts)
    branch = tree.branch_of(rec) if rec.op_type == OpType.STEP else None
    parent = branch.op_id if branch is not None else ""
    for i, att in enumerate(attempts):
        last = i == len(attempts) - 1
        if att.error is None:
            status = "succeeded"
        elif last and rec.status == OpStatus.FAILED:
            status = "failed"
        else:
            status = "retried"
        etype = error_type(att.error)
        bars.append(Bar("attempt", rec.op_id, rec.name or "", status, row_of(att.pid), att.start_ts,
                        att.end_ts if att.end_ts is not None else tree.end_of(rec), att.number,
                        error_line(att.error), etype if etype in KILL_TYPES else "", parent=parent))
    if rec.op_type == OpType.STEP and rec.status == OpStatus.STARTED and rec.attempt > len(attempts):
        start = attempts[-1].end_ts if attempts and attempts[-1].end_ts else rec.start_ts
        pid = branch.pid if branch is not None and branch.pid else None
        bars.append(Bar("attempt", rec.op_id, rec.name or "", "started", row_of(pid), start,
                        tree.end_of(rec), rec.attempt, parent=parent))
    return bars


def build_timeline(tree: OpTree) -> Timeline:
    bars: list[Bar] = []
    markers: list[Marker] = []
    inside: dict[str, set[int]] = {}  # branch op id -> pids that ran steps under it
    last_seen: dict[tuple[str, int], float] = {}

    for rec, _depth in tree.walk():
        branch = tree.branch_of(rec)
        if is_branch(rec):
            row = _branch_row(rec)
            etype = error_type(rec.error)
            bars.append(Bar("branch", rec.op_id, rec.name or "", _status(rec.status), row, rec.start_ts,
                            tree.end_of(rec), error=error_line(rec.error),
                            crash=etype if etype in KILL_TYPES else "",
                            parent=branch.op_id if branch is not None else ""))
            if rec.attempts:
                bars.extend(_attempt_bars(tree, rec, _worker_or(row)))
        elif rec.op_type == OpType.STEP:
            step_bars = _attempt_bars(tree, rec, _step_row(branch))
            bars.extend(step_bars)
            if branch is not None:
                for step_bar in step_bars:
                    if isinstance(step_bar.row, int):
                        inside.setdefault(branch.op_id, set()).add(step_bar.row)
                        key = (branch.op_id, step_bar.row)
                        last_seen[key] = max(last_seen.get(key, 0.0), step_bar.end)
        elif branch is None and (is_batch(rec) or rec.op_type in (OpType.CONTEXT, OpType.WAIT)):
            kind = "wait" if rec.op_type == OpType.WAIT else "context"
            bars.append(Bar(kind, rec.op_id, rec.name or rec.sub_type, _status(rec.status), DRIVER,
                            rec.start_ts, tree.end_of(rec), error=error_line(rec.error)))

    facts = crash_facts(tree)
    for death in facts.deaths:  # every worker death or kill, where it happened
        markers.append(Marker(death.pid or NO_WORKER, death.ts, f"{death.name}: {error_line(death.error)}",
                              death.op_id))
    by_id = {b.op_id: b for b in bars if b.kind == "branch"}
    dead = {(d.op_id, d.pid) for d in facts.deaths}
    for op_id, pids in inside.items():
        bar = by_id.get(op_id)
        if bar is None:
            continue
        for pid in sorted(p for p in pids if p != bar.row and (op_id, p) not in dead):
            markers.append(Marker(pid, last_seen[(op_id, pid)],
                                  f"{bar.name}: worker pid {pid} stopped (its driver was killed or interrupted); "
                                  f"the branch ran again in row {bar.row}", op_id, STOPPED))
    for bar in by_id.values():
        bar.redispatched = bar.op_id in facts.redispatched
    gaps = _gaps(facts.runs)
    for run in facts.runs:
        if not run.finished and not run.running:
            markers.append(Marker(DRIVER, run.end, f"run {run.number}: the driver stopped (killed or interrupted) "
                                                   f"before the execution finished", "", STOPPED))
    bars = _cut_at_gaps(bars, gaps)

    timeline = _layout(tree, bars, markers)
    timeline.runs, timeline.gaps = facts.runs, gaps
    timeline.summary = _summary(tree, bars, markers, facts)
    return timeline


def _cut_at_gaps(bars: list[Bar], gaps: list[tuple[float, float]]) -> list[Bar]:
    """Driver-row bars split where no driver existed (a killed run until its resume)."""
    if not gaps:
        return bars
    out = []
    for bar in bars:
        if bar.row != DRIVER:
            out.append(bar)
            continue
        start = bar.start
        for g0, g1 in gaps:
            if g0 < bar.end and g1 > start and g0 > start:
                out.append(dataclasses.replace(bar, start=start, end=g0))
                start = g1
        if start < bar.end:
            out.append(dataclasses.replace(bar, start=start))
    return out


def _unusual(bar: Bar) -> bool:
    return bar.status != "succeeded" or bool(bar.crash) or bar.redispatched or bar.kind in ("context", "wait")


def _sample(bars: list[Bar]) -> tuple[list[Bar], int]:
    """At most ``MAX_BARS``: every unusual bar, then an even sample of branches, then of attempts."""
    if len(bars) <= MAX_BARS:
        return bars, 0
    keep = [b for b in bars if _unusual(b)][:MAX_BARS]
    ordinary = [b for b in bars if not _unusual(b)]
    for group in ([b for b in ordinary if b.kind == "branch"], [b for b in ordinary if b.kind != "branch"]):
        room = MAX_BARS - len(keep)
        if room <= 0:
            break
        if len(group) <= room:
            keep.extend(group)
        else:
            stride = len(group) / room
            keep.extend(group[int(i * stride)] for i in range(room))
    return keep, len(bars) - len(keep)


def _layout(tree: OpTree, bars: list[Bar], markers: list[Marker]) -> Timeline:
    bars, hidden = _sample(bars)
    ex = tree.execution
    start = min([ex.created_ts] + [b.start for b in bars])
    end = max([ex.ended_ts or start] + [b.end for b in bars] + [m.ts for m in markers])
    first: dict[object, float] = {}
    for b in bars:
        first[b.row] = min(first.get(b.row, b.start), b.start)
    for m in markers:
        first.setdefault(m.row, m.ts)
    rows = sorted(first, key=lambda r: (r != DRIVER, r == NO_WORKER, first[r], str(r)))
    lanes: dict[object, int] = {}
    for row in rows:
        lanes[row] = _pack([b for b in bars if b.row == row])
    return Timeline(bars, markers, rows, lanes, start, max(end, start + 1e-3), hidden=hidden, execution=ex)


def _pack(bars: list[Bar]) -> int:
    """Give overlapping containers of one row separate lanes; leaves follow their container."""
    lane_of: dict[str, int] = {}
    free: list[tuple[float, int]] = []  # (end, lane)
    count = 0
    containers = {b.op_id for b in bars if b.container}
    items = sorted((b for b in bars if b.container or b.parent not in containers), key=lambda b: (b.start, -b.end))
    for bar in items:
        if free and free[0][0] <= bar.start:
            _end, lane = heapq.heappop(free)
        else:
            lane, count = count, count + 1
        bar.lane = lane
        heapq.heappush(free, (bar.end, lane))
        if bar.container:
            lane_of[bar.op_id] = lane
    for bar in bars:
        if not bar.container and bar.parent in containers:
            bar.lane = lane_of.get(bar.parent, 0)
    return max(count, 1)


def _summary(tree: OpTree, bars: list[Bar], markers: list[Marker], facts: CrashFacts) -> dict:
    ex = tree.execution
    branches = Counter(b.status for b in bars if b.kind == "branch")
    # step attempts only: a branch's "attempts" are the deaths of its workers, counted as crashes
    attempts = [b for b in bars if b.kind == "attempt" and tree.ops[b.op_id].op_type == OpType.STEP]
    steps = Counter(_status(r.status) for r in tree.ops.values() if r.op_type == OpType.STEP)
    workers = {b.row for b in bars if isinstance(b.row, int) and b.row != 0 and b.kind != "context"}
    end = ex.ended_ts if ex.ended_ts is not None else max([ex.started_ts] + [b.end for b in bars])
    return {
        "execution": ex.exec_id,
        "handler": ex.handler,
        "status": display_status(ex),
        "runs": ex.runs,
        "duration_s": round(end - ex.created_ts, 3),
        "workers": len(workers),
        "branches": dict(branches),
        "steps": dict(steps),
        "attempts": len(attempts),
        "retries": sum(1 for b in attempts if b.status == "retried"),
        "crashes": facts.crashes,
        "redispatched": len(facts.redispatched),
        "kills": facts.kills,
        "failed_branches": len(facts.failed_branches),
        "reran_after_resume": len(facts.reran_after_resume),
        "ran_in_resumed_runs": sum(n for k, n in facts.ran_in_run.items() if k > 1),
        "driver_runs": len(facts.runs),
        "gaps_s": [round(g1 - g0, 3) for g0, g1 in _gaps(facts.runs)],
        "markers": len(markers),
    }


def _gaps(runs: list[DriverRun]) -> list[tuple[float, float]]:
    return [(a.end, b.start) for a, b in zip(runs, runs[1:], strict=False) if b.start > a.end]
