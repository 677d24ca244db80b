"""``python -m durable_mp`` / ``durable-mp``: run, inspect, resume and clean up executions.

::

    durable-mp run examples/seed_dashboard.py:lambda_handler --id nightly
    durable-mp list                       # what is in the store
    durable-mp show nightly               # the operation tree
    durable-mp history nightly --json     # the reference's event history
    durable-mp report nightly -o nightly.html
    durable-mp resume nightly             # after a crash / Ctrl-C / kill
    durable-mp gc --older-than 7d --compact

Every command takes ``--store PATH`` (default: ``$DURABLE_MP_STORE`` or ``./.durable_mp``).
Exit status: 0 success, 1 the execution failed, 2 usage or store error (one line on
stderr, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from durable_mp.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    exec_id_arg,
    get_execution,
    one_line,
    open_store,
    result_text,
)
from durable_mp.cli.loader import HandlerError, load_handler
from durable_mp.cli.reading import cmd_check, cmd_history, cmd_list, cmd_report, cmd_show
from durable_mp.engine.start import START_METHODS
from durable_mp.exceptions import ExecutionFailedError, ExecutionLockedError, StoreError, ValidationError
from durable_mp.execution import DurableFunction, dumps_value
from durable_mp.inspect.tree import error_line
from durable_mp.map_items import HANDLER_MARK
from durable_mp.store.facade import Store, resolve_store_path
from durable_mp.store.maintenance import check_deletable, collect, compact, data_size, parse_duration
from durable_mp.store.records import FAILED, INTERRUPTED, RUNNING, ExecutionRecord

PROG = "durable-mp"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

log = logging.getLogger("durable_mp.cli.main")


class _LogSetup:
    """A stderr handler on the root logger for the duration of one command."""

    def __init__(self, level: str | None) -> None:
        self.level = getattr(logging, (level or "WARNING").upper())
        self.handler: logging.Handler | None = None
        self.old_level = logging.WARNING

    def __enter__(self) -> _LogSetup:
        root = logging.getLogger()
        self.old_level = root.level
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(self.handler)
        root.setLevel(self.level)
        return self

    def __exit__(self, *exc: Any) -> None:
        root = logging.getLogger()
        if self.handler is not None:
            root.removeHandler(self.handler)
        root.setLevel(self.old_level)


def _drive(handler: DurableFunction, store: Store, exec_id: str, event: Any, args: argparse.Namespace) -> int:
    log.info("execution %r: handler %s, store %s", exec_id, handler.handler_ref, store.path)
    try:
        result = handler.run(event, execution_id=exec_id, store=store, max_workers=args.max_workers,
                             progress=args.progress, resume_failed=args.resume_failed,
                             start_method=args.start_method)
    except ExecutionFailedError as exc:
        print(f"{PROG}: execution {exec_id!r} failed: {error_line(exc.error.to_dict(), 500)}", file=sys.stderr)
        stopped = store.get_execution(exec_id)
        if stopped is not None and stopped.status == RUNNING:  # non-determinism: the run failed, not the execution
            print(f"{PROG}: the code no longer matches the checkpoints of {exec_id!r}; it was stopped, not failed: "
                  f"revert the change and continue with: {PROG} resume {exec_id}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; continue with: {PROG} resume {exec_id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(result_text(result))
    return EXIT_OK


def _read_input(args: argparse.Namespace) -> Any:
    if args.input is not None and args.input_file is not None:
        raise CliError("give --input or --input-file, not both")
    if args.input_file is not None:
        try:
            if args.input_file == "-":
                text = sys.stdin.read()
            else:
                with open(args.input_file, encoding="utf-8") as f:
                    text = f.read()
        except OSError as exc:
            raise CliError(f"cannot read --input-file {args.input_file}: {exc.strerror}") from None
        where = args.input_file
    elif args.input is not None:
        text, where = args.input, "--input"
    else:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{where} is not valid JSON: {exc}") from None


def _register(store: Store, handler: DurableFunction, exec_id: str, event: Any, source: str | None) -> None:
    """Create a new execution's record up front, with where its handler came from.

    ``resume`` needs the file of a handler loaded from a path.  ``runs`` starts at 0: the
    engine's first claim of a RUNNING execution counts the run.
    """
    if store.get_execution(exec_id) is not None:
        return

    def make() -> ExecutionRecord:
        now = time.time()
        return ExecutionRecord(exec_id, RUNNING, handler.handler_ref, dumps_value(event), None, None, now, now, None,
                               0, 0.0, 0, {"source": source, "cwd": os.getcwd()})

    _rec, _created = store.acquire(exec_id, make)
    store.release(exec_id)


# -- commands ---------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    event = _read_input(args)
    exec_id = exec_id_arg(args.id) if args.id is not None else None
    with _LogSetup(args.log_level):
        handler, source = load_handler(args.handler)
        exec_id = exec_id or handler.execution_id_for(event)
        with open_store(args, write=True, create=True) as store:
            _register(store, handler, exec_id, event, source)
            return _drive(handler, store, exec_id, event, args)


def _stored_outcome(rec: ExecutionRecord, ref_loader: Callable[[], Any]) -> int:
    if rec.status != RUNNING and rec.error is not None:
        print(f"{PROG}: execution {rec.exec_id!r} failed: {error_line(rec.error, 500)}", file=sys.stderr)
        return EXIT_FAILED
    try:
        value = pickle.loads(rec.result) if rec.result is not None else None
    except Exception:  # noqa: BLE001 - the result's classes live in the handler's module
        try:
            ref_loader()
            value = pickle.loads(rec.result)  # type: ignore[arg-type]  # not None: the first loads raised
        except Exception as exc:  # noqa: BLE001
            raise CliError(
                f"the stored result of {rec.exec_id!r} cannot be loaded: {type(exc).__name__}: {exc}"
            ) from exc
    print(result_text(value))
    return EXIT_OK


def _how_to_resume_a_map(rec: ExecutionRecord) -> int:
    """A ``durable_mp.map`` execution has no handler to load: its function and items live in the
    program that called it, so the way to resume it is to run that call again."""
    extra = rec.extra or {}
    where = extra.get("source")
    how = (f"run `python {where}` again" + (f" in {extra['cwd']}" if extra.get("cwd") else "") if where
           else "run the cell or program that called it again")
    print(f"{PROG}: {rec.exec_id!r} is a durable_mp.map call; to resume it, {how}: the same durable_mp.map call "
          f"(same function, items and store) continues where it stopped, keeping the finished items.",
          file=sys.stderr)
    return EXIT_USAGE


def cmd_resume(args: argparse.Namespace) -> int:
    with _LogSetup(args.log_level), open_store(args, write=True) as store:
        rec = get_execution(store, args.id)
        extra = rec.extra or {}
        ref = args.handler or rec.handler
        source = None if args.handler else extra.get("source")

        if HANDLER_MARK in (rec.handler or ""):
            return _how_to_resume_a_map(rec)

        def load() -> DurableFunction:
            try:
                return load_handler(ref, source=source, paths=(extra.get("cwd") or "",))[0]
            except HandlerError as exc:
                raise CliError(f"cannot resume {rec.exec_id!r}: {exc}") from None

        if rec.status != RUNNING and not (rec.status == FAILED and args.resume_failed):
            log.info("execution %r already finished (%s)", rec.exec_id, rec.status)
            if rec.status == FAILED:
                return _stored_outcome(rec, load)
            try:  # the handler's run says so (and whether its code changed); the stored value is enough
                handler = load()
            except CliError:
                return _stored_outcome(rec, load)
            return _drive(handler, store, rec.exec_id, None, args)
        handler = load()
        if handler.handler_ref != rec.handler:
            log.warning("resuming %r with handler %s; it was started with %s", rec.exec_id, handler.handler_ref,
                        rec.handler)
        return _drive(handler, store, rec.exec_id, None, args)


def _compact(args: argparse.Namespace) -> None:
    before, after = compact(resolve_store_path(args.store))
    print(f"compacted: data file {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB", file=sys.stderr)


def cmd_delete(args: argparse.Namespace) -> int:
    with open_store(args, write=True) as store:
        rec = get_execution(store, args.id)
        try:
            check_deletable(rec, force=args.force)
        except StoreError as exc:
            raise CliError(str(exc)) from None
        n = len(store.ops(rec.exec_id))
        try:  # checked again in the deleting transaction: a driver may take the execution meanwhile
            store.delete_execution(rec.exec_id, lambda current: check_deletable(current, force=args.force))
        except StoreError as exc:
            raise CliError(str(exc)) from None
    print(f"deleted execution {rec.exec_id} ({n} operation records)", file=sys.stderr)
    if args.compact:
        _compact(args)
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    try:
        older = parse_duration(args.older_than)
    except ValueError as exc:
        raise CliError(f"--older-than: {exc}") from None
    with open_store(args, write=True) as store:
        result = collect(store, older, dry_run=args.dry_run)
        size = data_size(store.path)
    verb = "would delete" if args.dry_run else "deleted"
    for exec_id in result.deleted:
        print(exec_id)
    note = f"; {result.kept_unfinished} unfinished kept" if result.kept_unfinished else ""
    print(f"{verb} {len(result.deleted)} execution(s) finished more than {args.older_than} ago{note}; "
          f"data file {size / 2**20:.1f} MiB", file=sys.stderr)
    if args.compact and not args.dry_run:
        _compact(args)
    return EXIT_OK


# -- parser -----------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def build_parser() -> argparse.ArgumentParser:
    store_opt = argparse.ArgumentParser(add_help=False)
    store_help = "store directory (default: $DURABLE_MP_STORE or ./.durable_mp)"
    # SUPPRESS: a --store given before the command is not reset by the command's default
    store_opt.add_argument("--store", metavar="PATH", default=argparse.SUPPRESS, help=store_help)
    runner = argparse.ArgumentParser(add_help=False)
    runner.add_argument("--max-workers", type=_positive_int, metavar="N", help="worker processes (default: CPUs)")
    runner.add_argument("--start-method", choices=START_METHODS, default=None,
                        help="how workers start (default: the handler's option, else fork on Linux, spawn elsewhere)")
    runner.add_argument("--log-level", type=_level, metavar="LEVEL", default=None,
                        help="log to stderr at this level: DEBUG, INFO, WARNING (default), ERROR")
    runner.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars for parallel/map on stderr (default: when stderr is a terminal)")
    runner.add_argument("--resume-failed", action=argparse.BooleanOptionalAction, default=True,
                        help="run a FAILED execution again, replaying what succeeded and running what failed "
                             "(default); --no-resume-failed keeps it failed and prints its stored error")

    parser = argparse.ArgumentParser(prog=PROG, description="Run, inspect and resume durable_mp executions.")
    parser.add_argument("--store", metavar="PATH", default=None, help=store_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", parents=[store_opt, runner], help="run (or resume) an execution",
                       description="Import HANDLER, run it durably and print its result as JSON. Running the "
                                   "same id again resumes it (also a FAILED one: fix the code, run again), "
                                   "or returns the stored result if it SUCCEEDED.")
    p.add_argument("handler", metavar="MODULE:HANDLER", help="e.g. pkg.jobs:handler or path/to/jobs.py:handler")
    p.add_argument("--input", metavar="JSON", help="the event, as JSON (default: {})")
    p.add_argument("--input-file", metavar="PATH", help="read the event as JSON from PATH ('-' = stdin)")
    p.add_argument("--id", metavar="ID", help="execution id (default: derived from the handler and the event)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", parents=[store_opt, runner], help="continue an unfinished execution",
                       description="Continue execution ID with the handler and input recorded for it, like "
                                   "`run` with its id: an interrupted or FAILED execution resumes, a SUCCEEDED "
                                   "one prints its stored result.")
    p.add_argument("id", metavar="ID")
    p.add_argument("--handler", metavar="MODULE:HANDLER", help="use this handler instead of the recorded one")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("list", parents=[store_opt], help="list executions",
                       description="One line per execution: id, handler, status, start, duration, operations "
                                   "finished/recorded. INTERRUPTED = RUNNING with no live driver (resume it).")
    p.add_argument("--status", type=str.upper, choices=["RUNNING", "SUCCEEDED", "FAILED", INTERRUPTED],
                   metavar="S", help="only RUNNING (includes INTERRUPTED), SUCCEEDED, FAILED or INTERRUPTED")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", parents=[store_opt], help="show the operation tree of an execution",
                       description="The operation tree (parallel > branch > step ...) with status, attempts, "
                                   "duration and errors. Large batches show their first and last children, "
                                   "every unusual one, and counts of the rest.")
    p.add_argument("id", metavar="ID")
    p.add_argument("--limit", type=_positive_int, default=10, metavar="N",
                   help="children shown per operation before summarizing (default: 10)")
    p.add_argument("--all", action="store_true", help="show every operation")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("history", parents=[store_opt], help="print the event history of an execution",
                       description="The execution's events in the reference SDK's model (ExecutionStarted, "
                                   "ContextStarted, StepStarted, StepFailed with RetryDetails, ...).")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true", help="print the events as a JSON list")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("report", parents=[store_opt], help="write an HTML timeline of an execution",
                       description="Write one self-contained HTML file: a timeline with one row per process, "
                                   "one bar per branch and per step attempt, crashes and retries marked.")
    p.add_argument("id", metavar="ID")
    p.add_argument("-o", "--output", metavar="FILE", help="output file (default: ID.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("check", parents=[store_opt], help="check an execution's records against the invariants",
                       description="Reads every record of an execution and prints each broken invariant "
                                   "(a missing parent, an id the derivation does not give, unfinished work under "
                                   "a finished parent, a terminal record without its outcome). Exit 1 on any.")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("delete", parents=[store_opt], help="delete an execution and its operations",
                       description="Delete a finished execution and all its operation records.")
    p.add_argument("id", metavar="ID")
    p.add_argument("--force", action="store_true", help="also delete an unfinished (interrupted) execution")
    p.add_argument("--compact", action="store_true",
                   help="then shrink the data file (no other process may have the store open)")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("gc", parents=[store_opt], help="delete finished executions older than a duration",
                       description="Delete executions that finished more than DURATION ago (e.g. 7d, 12h, 30m). "
                                   "Unfinished executions are kept.")
    p.add_argument("--older-than", required=True, metavar="DURATION", help="e.g. 7d, 12h, 30m, 90s, 2w")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.add_argument("--compact", action="store_true",
                   help="then shrink the data file (no other process may have the store open)")
    p.set_defaults(func=cmd_gc)

    from durable_mp.cli import callback as cli_callback

    cli_callback.add_parser(sub, store_opt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``durable-mp`` / ``python -m durable_mp``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"{PROG}: {one_line(exc)}", file=sys.stderr)
        return exc.code
    except (StoreError, ExecutionLockedError, HandlerError, ValidationError) as exc:
        print(f"{PROG}: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `durable-mp history X | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return EXIT_OK
