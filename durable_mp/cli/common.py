"""What every ``durable-mp`` command shares: exit codes, the one-line user error, opening
the store, reading an execution, and printing results and times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from durable_mp.store.facade import Store, validate_exec_id
from durable_mp.store.records import ExecutionRecord

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    """A user error: printed as one line, exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def exec_id_arg(value: str) -> str:
    try:
        return validate_exec_id(value)
    except ValueError as exc:
        raise CliError(f"bad execution id: {exc}") from None


def open_store(args: argparse.Namespace, *, write: bool = False, create: bool = False) -> Store:
    """The store named by ``--store``; a missing one is an error unless ``create``."""
    return Store(args.store, readonly=not write, create=create)


def get_execution(store: Store, exec_id: str) -> ExecutionRecord:
    rec = store.get_execution(exec_id_arg(exec_id))
    if rec is None:
        raise CliError(f"no execution {exec_id!r} in the store {store.path}")
    return rec


def when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def result_text(value: Any) -> str:
    """The result as JSON (``to_dict()`` / dataclasses / arrays converted), else its repr."""
    utf8 = (getattr(sys.stdout, "encoding", "") or "").lower().replace("-", "").startswith("utf")
    try:
        return json.dumps(value, indent=2, ensure_ascii=not utf8, default=jsonable)
    except (TypeError, ValueError):
        return repr(value)
