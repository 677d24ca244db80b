"""What crashed, what ran again, and when each driver ran: one derivation for every view.

``show``, ``history`` and ``report`` all count crashes and re-runs from ``crash_facts``,
so they cannot disagree.  Everything is derived at inspection time from what the store
already holds; the driver records nothing extra per item during a run:

* **driver runs** (one run = one invocation in the reference's model): a run starts when
  a driver claims the execution (``ExecutionRecord.extra["run_starts"]``; older records
  only know the creation time and the latest run's start).  A run that was followed by
  another ended without finishing (killed or interrupted): its end is its last sign of
  life, the latest record timestamp before the next run started.
* **worker deaths**: a branch whose worker died keeps the death as an ``Attempt`` (pid,
  time, ``WorkerCrashedError``); a step run in a worker keeps it the same way.
* **re-dispatched branches**: a branch that ran again after a worker death, or whose steps
  ran in more than one process (its first worker stopped: a death, or a killed driver).
* **ran again after a resume**: branches that finished in a resumed run although an
  earlier run had started them (a step of theirs recorded before the resume).  A branch
  that was in flight when its driver was killed but had finished no step leaves no record
  of that first start: it counts only as finished in the resumed run (the store cannot
  tell it from an item first started there).
"""

from __future__ import annotations

import time

from durable_mp.core.records import OpRecord, OpStatus, OpType
from durable_mp.inspect.crash_model import CRASH_TYPE, DEATH_TYPES, CrashFacts, DriverRun, WorkerDeath
from durable_mp.inspect.tree import OpTree, error_type, is_branch
from durable_mp.store.records import RUNNING, ExecutionRecord, owner_alive

__all__ = ["CRASH_TYPE", "DEATH_TYPES", "CrashFacts", "DriverRun", "WorkerDeath", "crash_facts", "driver_runs"]

def run_starts(ex: ExecutionRecord) -> list[float]:
    """Start time of every run known to the store, oldest first."""
    recorded = [float(t) for t in (ex.extra or {}).get("run_starts") or ()]
    runs = max(ex.runs, 1)
    if len(recorded) < runs:
        recorded = [ex.created_ts] + recorded
    starts = sorted(recorded)[-runs:]
    if len(starts) < runs and ex.started_ts > starts[-1]:
        starts.append(ex.started_ts)  # an older record: only the latest run's start is known
    return starts


def _activity(ops: list[OpRecord]) -> list[float]:
    out = []
    for rec in ops:
        out.append(rec.start_ts)
        if rec.end_ts is not None:
            out.append(rec.end_ts)
        for att in rec.attempts:
            out.append(att.start_ts)
            if att.end_ts is not None:
                out.append(att.end_ts)
    return sorted(out)


def driver_runs(ex: ExecutionRecord, ops: list[OpRecord]) -> list[DriverRun]:
    starts = run_starts(ex)
    seen = _activity(ops)
    failed = {int(n) for n in (ex.extra or {}).get("failed_runs") or ()}
    runs = []
    for k, start in enumerate(starts):
        nxt = starts[k + 1] if k + 1 < len(starts) else None
        if nxt is not None:
            before = [t for t in seen if start <= t < nxt]
            end = max(before) if before else start
            runs.append(DriverRun(k + 1, start, end, finished=k + 1 in failed, failed=k + 1 in failed))
            continue
        if ex.status != RUNNING:
            runs.append(DriverRun(k + 1, start, max(ex.ended_ts or start, start), finished=True))
        elif owner_alive(ex):
            runs.append(DriverRun(k + 1, start, max(time.time(), start), finished=False, running=True))
        else:
            after = [t for t in seen if t >= start]
            runs.append(DriverRun(k + 1, start, max(after) if after else start, finished=False))
    return runs


def run_of(runs: list[DriverRun], ts: float) -> int:
    """The number of the run that was going at ``ts`` (the first run for earlier times)."""
    number = 1
    for r in runs:
        if ts >= r.start:
            number = r.number
    return number


def worker_deaths(tree: OpTree) -> list[WorkerDeath]:
    deaths = []
    for rec in tree.ops.values():
        if not (is_branch(rec) or rec.op_type == OpType.STEP):
            continue
        recorded = False
        for att in rec.attempts:
            kind = error_type(att.error)
            if kind in DEATH_TYPES and (is_branch(rec) or kind == CRASH_TYPE):
                deaths.append(WorkerDeath(rec.op_id, rec.name or "", att.pid, att.end_ts or att.start_ts,
                                          att.number, att.error or {}, kind))
                recorded = True
        if is_branch(rec) and not recorded and error_type(rec.error) in DEATH_TYPES:
            # older records keep only the final error of a branch killed for good
            deaths.append(WorkerDeath(rec.op_id, rec.name or "", rec.pid, rec.end_ts or rec.start_ts, rec.attempt,
                                      rec.error or {}, error_type(rec.error)))
    deaths.sort(key=lambda d: d.ts)
    return deaths


def _step_pids(tree: OpTree) -> dict[str, set[int]]:
    """Branch op id -> pids of the processes that ran steps directly under it."""
    out: dict[str, set[int]] = {}
    for rec in tree.ops.values():
        if rec.op_type != OpType.STEP:
            continue
        branch = tree.branch_of(rec)
        if branch is None:
            continue
        pids = {a.pid for a in rec.attempts if a.pid}
        if pids:
            out.setdefault(branch.op_id, set()).update(pids)
    return out


def crash_facts(tree: OpTree) -> CrashFacts:
    ops = list(tree.ops.values())
    runs = driver_runs(tree.execution, ops)
    facts = CrashFacts(runs, worker_deaths(tree))
    dead_in: dict[str, list[WorkerDeath]] = {}
    for d in facts.deaths:
        dead_in.setdefault(d.op_id, []).append(d)
    step_pids = _step_pids(tree)
    for rec in ops:
        if not is_branch(rec):
            continue
        if rec.status == OpStatus.FAILED:
            facts.failed_branches.append(rec.op_id)
        deaths = dead_in.get(rec.op_id, [])
        final_death = rec.status == OpStatus.FAILED and error_type(rec.error) in DEATH_TYPES
        if len(deaths) > (1 if final_death else 0):
            facts.redispatched.add(rec.op_id)
        others = {p for p in step_pids.get(rec.op_id, ()) if p != rec.pid}
        if rec.pid and others:
            facts.redispatched.add(rec.op_id)
        if rec.is_terminal and len(runs) > 1:
            finished_in = run_of(runs, rec.end_ts or rec.start_ts)
            facts.ran_in_run[finished_in] = facts.ran_in_run.get(finished_in, 0) + 1
            if finished_in > 1:
                first_seen = min([rec.start_ts] + [a.start_ts for a in rec.attempts]
                                 + [a.start_ts for c in tree.children(rec.op_id) for a in c.attempts])
                if run_of(runs, first_seen) < finished_in:
                    facts.reran_after_resume.add(rec.op_id)
                    facts.redispatched.add(rec.op_id)
    return facts
