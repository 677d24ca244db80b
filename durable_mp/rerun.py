"""What running an existing execution again does, and says (docs/architecture.md "Running a handler").

- A SUCCEEDED execution returns its stored result without running anything, and says so
  in one line: which execution, when it finished, how to recompute, and whether the
  handler's code changed since (``identity.code_fingerprint``, kept in the record).
- A FAILED execution is resumed (fix and resume): its failed checkpoints are reopened
  (``core.reopen``) before the handler runs, so successes replay and failures run again.
- A run stopped by a ``NonDeterministicExecutionError`` is left RUNNING with a mark, so the
  next run (code reverted) reopens what that error recorded and resumes.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from typing import Any

from durable_mp.core.records import branch_key
from durable_mp.core.reopen import NON_DETERMINISM, reopen
from durable_mp.core.vocabulary import BATCH_SUB_TYPES
from durable_mp.store.env import resolve_store_path
from durable_mp.store.facade import ExecutionRecord, Store

log = logging.getLogger("durable_mp.rerun")

CODE_KEY = "code"  # ExecutionRecord.extra: code_fingerprint of the handler that last ran it
STOPPED_KEY = "stopped"  # ExecutionRecord.extra: why a RUNNING execution was stopped without failing
STOPPED_BY_NON_DETERMINISM = "non-determinism"


def announce(message: str, level: int = logging.INFO) -> None:
    """One line for the person at the terminal: through logging if it is set up, else on stderr.

    Never both, so a configured logger does not see the line twice.
    """
    if log.hasHandlers() and log.isEnabledFor(level):
        log.log(level, message)
    else:
        print(f"durable_mp: {message}", file=sys.stderr, flush=True)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def delete_command(store: Store, exec_id: str) -> str:
    """The ``durable-mp delete`` command line for ``exec_id`` in ``store``."""
    cmd = f"durable-mp delete {shlex.quote(exec_id)}"
    if resolve_store_path() != store.path:
        cmd += f" --store {shlex.quote(str(store.path))}"
    return cmd


def stored_result_notice(store: Store, rec: ExecutionRecord, fingerprint: str | None) -> tuple[str, int]:
    """The line said when a SUCCEEDED execution's stored result is returned, and its log level."""
    ended = rec.ended_ts or rec.started_ts
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ended))
    stored = (rec.extra or {}).get(CODE_KEY)
    changed = fingerprint is not None and stored is not None and stored != fingerprint
    text = (f"execution {rec.exec_id!r} already SUCCEEDED at {when} ({_ago(time.time() - ended)}); returning "
            f"its stored result, nothing ran.")
    if changed:
        text += " The handler's code CHANGED since that run: the result is from the old code."
    text += f" To recompute: {delete_command(store, rec.exec_id)} (or pass another execution_id)."
    return text, logging.WARNING if changed else logging.INFO


def reopen_checkpoints(store: Store, exec_id: str, *, all_failed: bool) -> int:
    """Rewrite the execution's failed checkpoints so they run again (``core.reopen``); how many.

    Committed before the execution leaves FAILED, so a crash in between only repeats this.
    """
    changed = reopen(store.ops(exec_id), all_failed=all_failed)
    if not changed:
        return 0
    batches = {rec.op_id for rec in store.ops(exec_id) if rec.sub_type in BATCH_SUB_TYPES}
    index_of: dict[str, int] = {}
    for parent in {rec.parent_id for rec in changed if rec.parent_id in batches}:
        index_of.update((item.op_id, index) for index, item in store.branch_records(exec_id, parent).items())
    store.reopen(exec_id, [(rec.parent_id, branch_key(index_of[rec.op_id]) if rec.op_id in index_of else rec.op_id,
                            rec.dumps()) for rec in changed])
    return sum(1 for rec in changed if rec.sub_type not in BATCH_SUB_TYPES)


def is_non_determinism(exc: BaseException) -> bool:
    """Whether ``exc`` is (or was caused by) a ``NonDeterministicExecutionError``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {type(current).__name__, str(getattr(current, "error_type", "") or "").rsplit(".", 1)[-1]}
        if NON_DETERMINISM in names:
            return True
        current = current.__cause__ or current.__context__
    return False


def with_extra(rec: ExecutionRecord, **changes: Any) -> ExecutionRecord:
    """``rec`` with keys of its ``extra`` set (None removes a key)."""
    extra = dict(rec.extra or {})
    for key, value in changes.items():
        if value is None:
            extra.pop(key, None)
        else:
            extra[key] = value
    return rec._replace(extra=extra)


__all__ = ["announce", "is_non_determinism", "reopen_checkpoints", "stored_result_notice", "with_extra"]
