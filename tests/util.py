"""Helpers the test files share: marker counts, record builders, waiting, the command line.

Importable from every test directory (``pythonpath = tests`` in setup.cfg).  Process
hygiene is in ``procs.py``; the marker files the recovery scenarios write are
``durable_mp.bench.markers``'s (one byte appended per run).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from durable_mp.bench.markers import counts as marker_counts  # {i: runs} of one-byte-per-run markers <prefix>-<i>
from durable_mp.core.records import OpRecord, OpStatus, OpType
from durable_mp.store.records import ExecutionRecord

REPO = Path(__file__).resolve().parent.parent  # the checkout: README, examples/, durable_mp/
TESTS = REPO / "tests"


# -- marker files: what ran, counted across processes that may be killed ------------------------
def marker_count(directory: str | os.PathLike[str], name: str) -> int:
    """Runs recorded in marker ``name`` (one byte appended per run); 0 if it never ran."""
    path = os.path.join(directory, name)
    return os.path.getsize(path) if os.path.exists(path) else 0


def marker_file_indices(directory: str | os.PathLike[str], prefix: str | None = None) -> list[int]:
    """The index of every one-file-per-run marker, one entry per file.

    Files are named ``<prefix>-<index>-<anything unique>``; without a prefix,
    ``<index>-<anything unique>`` (other files are ignored).
    """
    out = []
    for name in os.listdir(directory):
        parts = name.split("-")
        if prefix is None:
            if name[0].isdigit():
                out.append(int(parts[0]))
        elif name.startswith(prefix + "-"):
            out.append(int(parts[1]))
    return out


def runs_per_index(directory: str | os.PathLike[str], prefix: str | None = None) -> dict[int, int]:
    """``{index: runs}`` of one-file-per-run markers (``marker_file_indices``)."""
    return dict(Counter(marker_file_indices(directory, prefix)))


# -- records ----------------------------------------------------------------------------------
def rec(op_id: str, parent: str, op_type: str, sub_type: str, name: str | None, start: float, end: float | None,
        status: str = OpStatus.SUCCEEDED, **kw: Any) -> OpRecord:
    """Any operation record, fields in the order a tree or history test thinks of them."""
    return OpRecord(op_id, parent, op_type, sub_type, name, status, start, end, **kw)


def step_record(op_id: str, parent_id: str = "", status: str = OpStatus.SUCCEEDED, result: Any = b"r",
                **kw: Any) -> OpRecord:
    """A step named after its id that ran from t=1 to t=2."""
    return OpRecord(op_id=op_id, parent_id=parent_id, op_type=OpType.STEP, sub_type="Step", name=op_id,
                    status=status, start_ts=1.0, end_ts=2.0, result=result, **kw)


def execution_record(exec_id: str, status: str = "RUNNING", **kw: Any) -> ExecutionRecord:
    """An execution record with no owner, started now (``kw`` overrides any field)."""
    now = time.time()
    fields: dict[str, Any] = dict(exec_id=exec_id, status=status, handler="mod:handler", input=b"event", result=None,
                                  error=None, created_ts=now, started_ts=now, ended_ts=None, owner_pid=0,
                                  owner_create_time=0.0, runs=1)
    fields.update(kw)
    return ExecutionRecord(**fields)


# -- waiting ----------------------------------------------------------------------------------
def wait_until(predicate: Callable[[], Any], seconds: float = 30.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``seconds`` pass; its last answer, as a bool."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)
    return True


# -- running a handler -------------------------------------------------------------------------
def run_skip_time(handler: Any, store: Any, event: Any = None, **kw: Any) -> Any:
    """``handler.run(event, store=store, skip_time=True, **kw)``: waits and retry delays take no time."""
    kw.setdefault("skip_time", True)
    return handler.run(event, store=store, **kw)


# -- the command line -------------------------------------------------------------------------
def run_cli(*args: str, store: Any, cwd: Any = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m durable_mp ARGS --store STORE`` in a fresh interpreter, output captured as text."""
    return subprocess.run([sys.executable, "-m", "durable_mp", *args, "--store", str(store)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


# -- notebooks ----------------------------------------------------------------------------------
def run_notebook_cell(source: str, cwd: Any, monkeypatch: Any, *, timeout: int, allow_errors: bool = False) -> list:
    """Run ``source`` as the one cell of a notebook in a real Jupyter kernel; the cell's outputs.

    Skips the test where nbformat, nbclient or ipykernel is missing.  The kernel imports
    durable_mp from this checkout.
    """
    import pytest

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(source))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return list(nb.cells[0].outputs)


def cell_stream(outputs: list, name: str) -> str:
    """The text a cell wrote to ``name`` (``"stdout"`` or ``"stderr"``)."""
    return "".join(o.get("text", "") for o in outputs if o.get("name") == name)


# -- documentation --------------------------------------------------------------------------------
def comparable_records(store: Any, execution_id: str) -> list[list]:
    """Every stored record of an execution as data two runs of one history share: ids, types,
    name, status, attempt, payload, error type and message, batch summary; without clock
    readings, pids and tracebacks (``store``: a ``durable_mp.store.facade.Store``)."""
    timing = {"slept", "scheduled_end"}  # a wait's seconds slept and end time
    out = []
    for rec in store.ops(execution_id):
        result = rec.result if isinstance(rec.result, str) or rec.result is None else rec.result.hex()
        error = None if rec.error is None else [rec.error.get("ErrorType"), rec.error.get("ErrorMessage")]
        extra = repr(sorted((k, v) for k, v in (rec.extra or {}).items() if k not in timing))
        out.append([rec.op_id, rec.parent_id, rec.op_type, rec.sub_type, rec.name, rec.status, rec.attempt,
                    result, error, extra])
    return sorted(out, key=repr)


DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def doc_block(first_line: str) -> str:
    """The fenced python block of the README or ``docs/`` whose source starts with ``first_line``."""
    for doc in DOC_FILES:
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S):
            if block.startswith(first_line):
                return block
    raise AssertionError(f"no python block of README.md or docs/ starts with {first_line!r}")


__all__ = ["DOC_FILES", "REPO", "TESTS", "cell_stream", "doc_block", "execution_record", "marker_count", "marker_counts", "marker_file_indices", "rec",
           "run_cli", "run_notebook_cell", "run_skip_time", "runs_per_index", "step_record", "wait_until"]
