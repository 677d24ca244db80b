"""Which checkpoints a re-run opens again, and what they become.

Fix and resume: docs/architecture.md "Running a handler".

Running a FAILED execution again replays every operation that SUCCEEDED and runs the
failed ones again, as new attempts.  A FAILED checkpoint is terminal, so replay would
just raise its failure again; before the run starts, each one is rewritten into the
state of an operation that is due to run:

- a step (any ``STEP`` record): ``PENDING`` with no retry time, so its next attempt runs at
  once, numbered after the last one; ``extra[RERUN_BASE]`` holds the attempts made before,
  so the retry strategy gives the new run its whole budget;
- a context (a child context, a parallel branch, a map item): ``STARTED``, its failed run
  kept as one more entry of ``attempts`` (error, start, end, pid);
- a parallel or map that has a reopened item: ``STARTED``, so it runs that item (and any it
  never started) and replays the others.

A RUNNING execution that is resumed reopens only what a ``NonDeterministicExecutionError``
recorded: that error stops a run without failing it (the code changed under a checkpoint;
reverting the change and running again must resume).  Callback records are never
reopened: only the other side can complete a callback.
"""

from __future__ import annotations

from collections.abc import Iterable

from durable_mp.core.records import Attempt, OpRecord, OpStatus, OpType
from durable_mp.core.vocabulary import BATCH_SUB_TYPES

RERUN_BASE = "rerun_base"  # extra key of a reopened step: attempts it had made before this run
NON_DETERMINISM = "NonDeterministicExecutionError"


def is_non_determinism(rec: OpRecord) -> bool:
    """Whether a FAILED record holds a non-determinism error (directly or carried up by a branch)."""
    error_type = str((rec.error or {}).get("ErrorType") or "")
    return rec.status == OpStatus.FAILED and (
        error_type.rsplit(".", 1)[-1] == NON_DETERMINISM
        or bool((rec.extra or {}).get("fatal")) and (rec.extra or {}).get("raise") == NON_DETERMINISM)


def _reopened(rec: OpRecord) -> OpRecord:
    if rec.op_type == OpType.STEP:
        return rec._replace(status=OpStatus.PENDING, end_ts=None, next_attempt_ts=None,
                            extra={RERUN_BASE: rec.attempt})
    failed_run = Attempt(len(rec.attempts) + 1, rec.start_ts, rec.end_ts, rec.pid, rec.error)
    return rec._replace(status=OpStatus.STARTED, end_ts=None, result=None, error=None,
                        attempt=max(rec.attempt, len(rec.attempts) + 1),
                        attempts=(*rec.attempts, failed_run), extra=None)


def reopen(records: Iterable[OpRecord], *, all_failed: bool) -> list[OpRecord]:
    """The records to rewrite before a re-run, already rewritten.

    ``all_failed``: every FAILED record runs again (a FAILED execution run again);
    otherwise only those of a non-determinism error (a RUNNING execution resumed).
    """
    records = list(records)
    out: list[OpRecord] = []
    parents: set[str] = set()
    for rec in records:
        if rec.status != OpStatus.FAILED or rec.op_type == OpType.CALLBACK:
            continue
        if all_failed or is_non_determinism(rec):
            out.append(_reopened(rec))
            parents.add(rec.parent_id)
    for rec in records:
        if (rec.op_id in parents and rec.op_type == OpType.CONTEXT and rec.sub_type in BATCH_SUB_TYPES
                and rec.status == OpStatus.SUCCEEDED):
            out.append(rec._replace(status=OpStatus.STARTED, end_ts=None, extra=None))
    return out


__all__ = ["RERUN_BASE", "is_non_determinism", "reopen"]
