"""The commands that only read a store: ``list``, ``show``, ``history``, ``report``, ``check``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from durable_mp.cli.common import EXIT_FAILED, EXIT_OK, CliError, get_execution, open_store, when
from durable_mp.core.records import OpStatus
from durable_mp.core.vocabulary import SubType
from durable_mp.history_payloads import HistoryPayloads
from durable_mp.inspect.history import build_history, format_history
from durable_mp.inspect.report import write_report
from durable_mp.inspect.runs import crash_facts
from durable_mp.inspect.tree import OpTree, render_tree, waiting_callbacks
from durable_mp.map_items import HANDLER_MARK, plan_of
from durable_mp.map_items import describe as describe_map
from durable_mp.store.audit import audit
from durable_mp.store.records import INTERRUPTED, RUNNING, ExecutionRecord, display_status


def _map_items(rec: ExecutionRecord, ops: list[Any]) -> dict[str, int]:
    """A map execution's progress in its own words: items done (reused ones included) of all its items."""
    plan = plan_of(rec)
    if plan is None:
        return {}
    batches = {r.op_id for r in ops if r.parent_id == "" and r.sub_type == SubType.MAP}
    done = sum(1 for r in ops if r.parent_id in batches and r.status == OpStatus.SUCCEEDED)
    return {"items_done": plan.reused + done, "items_total": plan.total}


def cmd_list(args: argparse.Namespace) -> int:
    wanted = args.status.upper() if args.status else None
    rows: list[dict[str, Any]] = []
    with open_store(args) as store:
        for rec in store.list_executions():
            status = display_status(rec)
            if wanted and status != wanted and not (wanted == RUNNING and status == INTERRUPTED):
                continue
            ops = store.ops(rec.exec_id)
            done, total = sum(1 for r in ops if r.is_terminal), len(ops)
            end = rec.ended_ts if rec.ended_ts is not None else (time.time() if status == RUNNING else None)
            rows.append({"id": rec.exec_id, "handler": rec.handler, "status": status, "started": when(rec.created_ts),
                         "duration_s": None if end is None else round(end - rec.created_ts, 3),
                         "ops_done": done, "ops_total": total, "runs": rec.runs,
                         "waiting_callbacks": waiting_callbacks(rec.exec_id, ops) if rec.status == RUNNING else [],
                         **_map_items(rec, ops)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no executions" + (f" with status {wanted}" if wanted else ""), file=sys.stderr)
        return EXIT_OK
    table = [("ID", "HANDLER", "STATUS", "STARTED", "DURATION", "OPS")]
    for r in rows:
        dur = "-" if r["duration_s"] is None else f"{r['duration_s']:.1f}s"
        progress = (f"{r['items_done']}/{r['items_total']} items" if "items_total" in r
                    else f"{r['ops_done']}/{r['ops_total']}")
        table.append((r["id"], r["handler"], r["status"], r["started"], dur, progress))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row, r in zip(table, [{}, *rows], strict=True):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        for cb in r.get("waiting_callbacks", ()):  # what `durable-mp callback ID` needs
            print(f"  waiting for callback {cb['name'] or cb['operation_id']!r}: {cb['id']}")
    return EXIT_OK


def _tree(args: argparse.Namespace) -> OpTree:
    with open_store(args) as store:
        rec = get_execution(store, args.id)
        return OpTree(rec, store.ops(rec.exec_id))


def cmd_show(args: argparse.Namespace) -> int:
    tree = _tree(args)
    print(render_tree(tree, None if args.all else args.limit, crash_facts(tree)))
    if HANDLER_MARK in (tree.execution.handler or ""):
        with open_store(args) as store:
            for line in describe_map(store, tree.execution):
                print(line)
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    tree = _tree(args)
    events = build_history(tree.execution, tree.recorded(), HistoryPayloads())
    if args.json:
        print(json.dumps([e.to_dict() for e in events], indent=2))
    else:
        print(format_history(events))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    tree = _tree(args)
    out = args.output or f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in tree.execution.exec_id)}.html"
    try:
        path = write_report(tree, out)
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror}") from None
    print(f"wrote {os.path.abspath(path)}", file=sys.stderr)
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Audit an execution's records against the engine's invariants (``store.audit``)."""
    with open_store(args) as store:
        rec = get_execution(store, args.id)
        problems = audit(store, rec.exec_id)
        n = len(store.ops(rec.exec_id))
    for problem in problems:
        print(problem)
    verdict = f"{len(problems)} invariant violation(s)" if problems else "all invariants hold"
    print(f"checked execution {rec.exec_id} ({n} operation records): {verdict}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK
