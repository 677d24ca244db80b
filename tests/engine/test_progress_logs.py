"""Progress and logs (issue 10, item 6): log lines do not break the bar, a resumed bar keeps its
counts, the bar shows in a real Jupyter kernel.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from durable_mp.engine import progress
from util import REPO, cell_stream, run_notebook_cell

pytestmark = pytest.mark.timeout(120)

ROOT = REPO
CLEAR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

BAR_JOB = textwrap.dedent(
    """
    import logging, sys, time
    import durable_mp

    if sys.argv[2] == "basicConfig":
        logging.basicConfig(format="%(levelname)s %(message)s")

    def work(x):
        time.sleep(0.05)
        if x % 4 == 1:
            logging.getLogger("job").warning("LOGMARK item %d", x)
        return x

    if __name__ == "__main__":
        durable_mp.map(work, range(16), name="bar-job", store=sys.argv[1], max_workers=1, progress=True)
    """
)


def segments_after_carriage_returns(text: str) -> list[str]:
    """What a terminal would show on each line: the text after the line's last ``\\r``."""
    return [CLEAR.sub("", line).rsplit("\r", 1)[-1] for line in text.split("\n")]


@pytest.mark.parametrize("logging_setup", ["lastResort", "basicConfig"])
def test_log_records_are_written_above_the_bar_not_into_it(store_path, tmp_path, logging_setup):
    script = tmp_path / "bar_job.py"
    script.write_text(BAR_JOB)
    run = subprocess.run([sys.executable, str(script), store_path, logging_setup], capture_output=True, text=True,
                         timeout=90, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = [s for s in segments_after_carriage_returns(run.stderr) if "LOGMARK" in s]
    assert len(lines) == 4, run.stderr
    prefix = "WARNING " if logging_setup == "basicConfig" else ""
    for line in lines:
        assert line.startswith(prefix + "LOGMARK item"), f"a log line broke into the bar: {line!r}"
    assert "bar-job" in run.stderr and "16/16" in run.stderr


def test_bar_starts_at_the_stored_done_and_failed_counts():
    stream = io.StringIO()
    bar = progress.TqdmProgress(stream).start("resumed", 10, done=4, failed=2)
    bar.item(False)
    bar.close()
    text = stream.getvalue()
    assert "4/10" in text and "failed=2" in text and "5/10" in text and "failed=3" in text


def test_log_handlers_are_restored_after_the_bar(capsys):
    import logging

    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        bar = progress.TqdmProgress(io.StringIO()).start("x", 2)
        assert isinstance(handler.stream, progress._TqdmStream)
        bar.close()
        assert handler.stream is sys.stderr
    finally:
        root.removeHandler(handler)


RESUME_JOB = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import durable_mp

    MARKERS = Path(sys.argv[2])

    def work(x):
        time.sleep(0.1)
        (MARKERS / f"done-{x}").touch()
        if x % 2:
            raise ValueError(f"odd {x}")
        return x

    if __name__ == "__main__":
        durable_mp.map(work, range(30), name="resume-job", store=sys.argv[1], max_workers=2, progress=True,
                       tolerate_failures=True)
        print("OK", flush=True)
    """
)


def test_a_resumed_bar_starts_with_the_stored_done_and_failed_counts(store_path, tmp_path):
    script = tmp_path / "resume_job.py"
    script.write_text(RESUME_JOB)
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), store_path, str(markers)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(list(markers.iterdir())) < 12 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None
        time.sleep(0.5)  # let the group commit write what finished
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    run = subprocess.run([sys.executable, str(script), store_path, str(markers)], capture_output=True, text=True,
                         timeout=90)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr
    first = next(s for s in segments_after_carriage_returns(run.stderr.replace("\r", "\n\r")) if "resume-job" in s)
    done, total = map(int, re.search(r"(\d+)/(\d+)", first).groups())
    assert total == 30 and done >= 6, first
    failed_shown = [int(m) for m in re.findall(r"failed=(\d+)", run.stderr)]
    assert failed_shown and failed_shown[0] >= 3, run.stderr  # about half the stored items failed


NOTEBOOK_CELL = textwrap.dedent(
    """
    import durable_mp, time

    def slow_square(x):
        time.sleep(0.02)
        return x * x

    print("RESULT", durable_mp.map(slow_square, range(12), name="nb-map", store={store!r}, max_workers=2))
    """
)


def test_progress_shows_in_a_real_jupyter_kernel(tmp_path, monkeypatch):
    outputs = run_notebook_cell(NOTEBOOK_CELL.format(store=str(tmp_path / "store")), tmp_path, monkeypatch, timeout=90)
    stdout = cell_stream(outputs, "stdout")
    shown = cell_stream(outputs, "stderr")
    widgets = [o for o in outputs if o.get("output_type") == "display_data"]
    assert "RESULT [0, 1, 4, 9, 16, 25, 36, 49, 64, 81, 100, 121]" in stdout, outputs
    assert ("nb-map" in shown and "12/12" in shown) or widgets, f"no progress in the notebook: {outputs}"
