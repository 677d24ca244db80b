"""``durable_mp.map(f, items)`` (issue 10, item 4) on real processes and a real store.

Each item leaves a marker file per run (``<index>-<pid>``), so tests count how often items
ran: a SIGKILLed worker costs the item it ran, a killed driver's re-run runs again only
what had not been checkpointed.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import pytest

import durable_mp
from durable_mp import ValidationError
from durable_mp.pmap import execution_id_for
from util import marker_file_indices, runs_per_index

pytestmark = pytest.mark.timeout(90)

HERE = __file__
MARKERS = os.environ.get("PMAP_TEST_MARKERS", "")


def square(x):
    time.sleep(0.01 * (x % 3))  # items finish out of input order
    return x * x


def test_results_in_input_order(store_path):
    assert durable_mp.map(square, range(25), store=store_path, max_workers=2) == [x * x for x in range(25)]


def test_same_call_again_returns_without_running_and_the_id_tells_calls_apart(store_path):
    assert durable_mp.map(square, [1, 2, 3], store=store_path) == [1, 4, 9]
    assert durable_mp.map(square, [1, 2, 3], store=store_path) == [1, 4, 9]
    assert durable_mp.map(square, [1, 2, 4], store=store_path) == [1, 4, 16]
    same = execution_id_for(square, [1, 2, 3])
    assert same == execution_id_for(square, [1, 2, 3]) and same.startswith("map-square-")
    assert same != execution_id_for(square, [1, 2, 4])
    assert same != execution_id_for(square, [1, 2, 3], name="other")
    assert same != execution_id_for(lambda x: x, [1, 2, 3])


def fails_on_three(x):
    if x == 3:
        raise ValueError(f"bad item {x}")  # the failing line
    return x


FAIL_LINE = inspect.getsourcelines(fails_on_three)[1] + 2


def test_first_failure_raises_with_item_type_and_remote_traceback(store_path):
    with pytest.raises(ValueError, match="bad item 3") as info:
        durable_mp.map(fails_on_three, range(8), store=store_path, max_workers=2)
    assert info.value.index == 3
    text = "".join(traceback.format_exception(info.value))
    assert "item 3 of 8 failed" in text
    assert "RemoteTraceback" in text and f'File "{HERE}", line {FAIL_LINE}, in fails_on_three' in text


def test_tolerate_failures_puts_the_error_in_place(store_path):
    out = durable_mp.map(fails_on_three, range(6), store=store_path, tolerate_failures=True)
    assert [x for i, x in enumerate(out) if i != 3] == [0, 1, 2, 4, 5]
    assert isinstance(out[3], ValueError) and out[3].index == 3
    assert "bad item 3" in str(out[3])


def test_a_function_that_cannot_take_one_item_is_refused_at_once(store_path):
    with pytest.raises(ValidationError, match=r"func\(item\)"):
        durable_mp.map(lambda ctx, x, i, xs: x, [1, 2], store=store_path)


def mark_and_maybe_die(x):
    markers = Path(os.environ["PMAP_TEST_MARKERS"])
    (markers / f"{x}-{os.getpid()}").touch()
    if x == 7 and not (markers / "killed").exists():
        (markers / "killed").touch()
        os.kill(os.getpid(), signal.SIGKILL)  # this worker dies mid-item, once
    time.sleep(0.02)
    return -x


def test_a_sigkilled_worker_costs_one_item(store_path, tmp_path, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("PMAP_TEST_MARKERS", str(markers))
    assert durable_mp.map(mark_and_maybe_die, range(20), store=store_path, max_workers=2) == [-x for x in range(20)]
    assert (markers / "killed").exists()
    counts = runs_per_index(markers)
    assert counts == {i: (2 if i == 7 else 1) for i in range(20)}


JOB = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import durable_mp

    MARKERS = Path(sys.argv[2])

    def work(x):
        (MARKERS / f"start-{x}-{os.getpid()}-{time.monotonic_ns()}").touch()
        time.sleep(0.15)
        (MARKERS / f"done-{x}-{os.getpid()}-{time.monotonic_ns()}").touch()
        return x + 1000

    if __name__ == "__main__":
        out = durable_mp.map(work, range(40), store=sys.argv[1], max_workers=2, progress=False)
        assert out == [x + 1000 for x in range(40)], out
        print("OK", flush=True)
    """
)


@pytest.mark.timeout(120)
def test_rerunning_the_same_call_after_a_driver_kill_resumes(store_path, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), store_path, str(first)])
    try:
        deadline = time.monotonic() + 60
        while len(marker_file_indices(first, "done")) < 12 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done_before = set(marker_file_indices(first, "done"))
    run = subprocess.run([sys.executable, str(script), store_path, str(second)], capture_output=True, text=True,
                         timeout=90)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr
    again = set(marker_file_indices(second, "start"))
    redone = again & done_before
    # the re-run runs what had not finished; of the finished items, at most the last few whose
    # checkpoints were not yet committed when the driver died run again
    assert set(range(40)) - done_before <= again
    assert len(redone) <= 4, f"items finished before the kill that ran again: {sorted(redone)}"
    assert len(again) < 40 - len(done_before) + 5


def buggy_until_fixed(x):
    markers = Path(os.environ["PMAP_TEST_MARKERS"])
    (markers / f"{x}-{os.getpid()}-{time.monotonic_ns()}").touch()
    if x == 5 and not (markers / "fixed").exists():
        raise RuntimeError("bug in item 5")
    return x * 10


def test_fix_and_rerun_keeps_the_finished_items(store_path, tmp_path, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("PMAP_TEST_MARKERS", str(markers))
    with pytest.raises(RuntimeError, match="bug in item 5"):
        durable_mp.map(buggy_until_fixed, range(12), store=store_path, max_workers=2)
    first = runs_per_index(markers)
    (markers / "fixed").touch()
    assert durable_mp.map(buggy_until_fixed, range(12), store=store_path, max_workers=2) == [x * 10 for x in range(12)]
    second = runs_per_index(markers)
    ran_again = {i for i in second if second[i] > first.get(i, 0)}
    assert 5 in ran_again
    assert not ran_again & (set(first) - {5}), "items that succeeded in the first run must not run again"


CHANGING = textwrap.dedent(
    """
    import sys
    import durable_mp

    def scale(x):
        return x * FACTOR

    FACTOR = 2

    if __name__ == "__main__":
        print(durable_mp.map(scale, [1, 2, 3], store=sys.argv[1], progress=False), flush=True)
    """
)


def test_a_changed_global_value_is_another_computation(store_path, tmp_path):
    script = tmp_path / "scale.py"
    script.write_text(CHANGING)

    def run():
        done = subprocess.run([sys.executable, str(script), store_path], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip(), done.stderr

    assert run()[0] == "[2, 4, 6]"
    out, err = run()
    assert out == "[2, 4, 6]" and "stored results, nothing ran" in err and "CHANGED" not in err
    script.write_text(CHANGING.replace("FACTOR = 2", "FACTOR = 3"))
    out, err = run()
    assert out == "[3, 6, 9]", err  # a global the function reads is part of which computation it is
