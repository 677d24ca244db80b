"""Issue 19 items 5-8: ``durable_mp.map`` as a script, the CLI, a notebook kernel and Dask meet it.

Scripts run in subprocesses with stderr captured (so not a terminal), get Ctrl-C as a
real SIGINT, and count their items with marker files (``bench.markers``).
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import durable_mp
from durable_mp.bench.markers import counts, mark
from durable_mp.store.facade import Store
from util import cell_stream, run_notebook_cell, wait_until

pytestmark = pytest.mark.timeout(150)

JOB = textwrap.dedent(
    """
    import os, sys, time
    import durable_mp
    from durable_mp.bench.markers import mark

    def work(x):
        mark(sys.argv[2], f"item-{x}")
        time.sleep(0.1)
        return x + 1000

    if __name__ == "__main__":
        out = durable_mp.map(work, range(30), store=sys.argv[1], max_workers=2, progress=False)
        assert out == [x + 1000 for x in range(30)], out
        print("OK", flush=True)
    """
)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "durable_mp", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(durable_mp.__file__).parent.parent)})


def test_ctrl_c_prints_one_line_then_resume_says_how_many_items_are_done(store_path, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(durable_mp.__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, str(script), store_path, str(marks)], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        wait_until(lambda: len(counts(str(marks), "item")) >= 8 or proc.poll() is not None, seconds=60.0, interval=0.02)
        assert proc.poll() is None, "the job ended before Ctrl-C"
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "run the same call again to resume" in lines[0], err
    with Store(store_path) as store:
        (rec,) = store.list_executions()
    listed = _cli("list", "--store", store_path)
    assert listed.returncode == 0 and "/30 items" in listed.stdout, listed
    done = _cli("resume", rec.exec_id, "--store", store_path)
    assert done.returncode == 2
    assert "durable_mp.map" in done.stderr and f"python {script}" in done.stderr, done.stderr
    assert "has no attribute" not in done.stderr
    first = counts(str(marks), "item")
    again = subprocess.run([sys.executable, str(script), store_path, str(marks)], capture_output=True, text=True,
                           timeout=90, env=env)
    assert again.returncode == 0 and "OK" in again.stdout, again.stderr
    resumed = [line for line in again.stderr.splitlines() if "resuming:" in line]
    assert len(resumed) == 1 and "of 30 items already done" in resumed[0], again.stderr
    n_done = int(resumed[0].split("resuming: ")[1].split()[0])
    assert n_done >= len(first) - 4  # at most the items in flight at the interrupt ran again
    assert "branch" not in again.stderr and "resume_failed" not in again.stderr


def slow_double(x):
    return x * 2


@pytest.mark.timeout(120)
def test_map_takes_start_method(store_path):
    assert durable_mp.map(slow_double, range(6), store=store_path, start_method="spawn",
                          max_workers=2) == [0, 2, 4, 6, 8, 10]


@pytest.mark.timeout(150)
def test_map_runs_on_dask(store_path, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    from procs import leftover_children

    monkeypatch.setenv("MAP_TEST_MARKERS", str(tmp_path))
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                       silence_logs=40)
    client = distributed.Client(cluster)
    try:
        assert durable_mp.map(dask_item, range(5), store=store_path, backend=client) == [0, 2, 4, 6, 8]
        pids = {int(p.read_text()) for p in tmp_path.glob("pid-*")}
        assert os.getpid() not in pids and len(pids) >= 1
    finally:
        client.close()
        cluster.close()
    assert not leftover_children(10.0)


def dask_item(x):
    (Path(os.environ["MAP_TEST_MARKERS"]) / f"pid-{x}").write_text(str(os.getpid()))
    return x * 2


def big(x):
    import numpy as np

    return np.full(1 << 20, x, dtype=np.float64)  # 8 MiB


def _disk_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


def test_each_result_is_stored_once(store_path):
    out = durable_mp.map(big, range(6), store=store_path, max_workers=2)
    assert [float(a[0]) for a in out] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    results = 6 * 8 * (1 << 20)
    assert _disk_bytes(store_path) <= results * 1.1, (_disk_bytes(store_path), results)
    again = durable_mp.map(big, range(6), store=store_path)  # read back from the item records
    assert all((a == b).all() for a, b in zip(out, again, strict=True))


def count_item(x):
    mark(os.environ["MAP_TEST_MARKERS"], f"item-{x}")
    return x


NOTEBOOK = [
    """
    import os, durable_mp
    from durable_mp.bench.markers import mark
    STORE, MARKS = {store!r}, {marks!r}

    def lookup(x):
        mark(MARKS, f"item-{{x}}")
        return {{"a": 1}}[x] if x == 5 else x * 10
    """,
    """
    try:
        durable_mp.map(lookup, range(20), store=STORE, max_workers=2, progress=False)
    except KeyError as exc:
        print("CAUGHT", repr(exc), exc.index)
    from durable_mp.bench.markers import counts
    print("BEFORE", sorted(counts(MARKS, "item").items()))
    """,
    """
    def lookup(x):  # the fix, in the same cell re-run
        mark(MARKS, f"item-{{x}}")
        return x * 10
    """,
    """
    print("RESULT", durable_mp.map(lookup, range(20), store=STORE, max_workers=2, progress=False))
    """,
]


@pytest.mark.timeout(150)
def test_fixing_a_failing_function_in_a_real_kernel_keeps_the_finished_items(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    marks = tmp_path / "marks"
    marks.mkdir()
    nb = nbformat.v4.new_notebook()
    for cell in NOTEBOOK:
        nb.cells.append(nbformat.v4.new_code_cell(textwrap.dedent(cell).format(store=str(tmp_path / "store"),
                                                                               marks=str(marks))))
    monkeypatch.setenv("PYTHONPATH", str(Path(durable_mp.__file__).parent.parent))
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    def text(cell: int, stream: str) -> str:
        return "".join(o.get("text", "") for o in nb.cells[cell].outputs if o.get("name") == stream)

    assert "CAUGHT KeyError(5) 5" in text(1, "stdout"), nb.cells[1].outputs
    before = dict(ast.literal_eval(text(1, "stdout").split("BEFORE ")[1]))
    assert "RESULT " + str([x * 10 for x in range(20)]) in text(3, "stdout"), nb.cells[3].outputs
    after = counts(str(marks), "item")
    again = {i for i in after if after[i] > before.get(i, 0)}
    assert 5 in again and not again & (set(before) - {5}), (before, after)
    assert "resuming:" in text(3, "stderr") and "changed code" in text(3, "stderr"), nb.cells[3].outputs


INTERRUPTED_CELL = """
import os, signal, threading, time, durable_mp

def slow(x):
    time.sleep(0.2)
    return x

threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C (Interrupt) after 2 s
durable_mp.map(slow, range(60), store={store!r}, max_workers=2, progress=False)
"""


@pytest.mark.timeout(150)
def test_interrupting_a_map_in_a_real_kernel_shows_one_line(tmp_path, monkeypatch):
    outputs = run_notebook_cell(INTERRUPTED_CELL.format(store=str(tmp_path / "store")), tmp_path, monkeypatch,
                                timeout=120, allow_errors=True)
    shown = cell_stream(outputs, "stderr")
    tracebacks = [o for o in outputs if o.get("output_type") == "error"]
    assert "interrupted with" in shown and "run the same call again to resume" in shown, outputs
    assert sum(len(o.get("traceback", [])) for o in tracebacks) <= 2, tracebacks
