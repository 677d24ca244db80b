"""After real crashes and resumes, ``show``, ``history`` and ``report`` tell the same, true story.

Two executions really crash: a worker is SIGKILLed from inside a map item (the engine
re-dispatches the item), and a driver is SIGKILLed mid-map while an item had finished one
of its two steps, then resumed with ``durable-mp resume``.  A third item fails for good.
Each view is read the way a user reads it (the CLI, the HTML's data attributes) and they
must agree on how many workers crashed, which items were re-dispatched or ran again after
the resume, which failed; the report must draw the crash markers, the failed item and the
time without a driver as a gap.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser

import pytest

from durable_mp.store.facade import Store
from util import run_cli

pytestmark = pytest.mark.timeout(120)
POLL_S = 0.01
WAIT_S = 60.0

JOB = '''
import os, signal, time
from durable_mp import durable_execution
from durable_mp.config import CompletionConfig, MapConfig, StepConfig
from durable_mp.retries import RetryStrategyConfig, create_retry_strategy

ONCE = StepConfig(retry_strategy=create_retry_strategy(RetryStrategyConfig(max_attempts=1)))
CRASH_MARK = os.environ.get("CRASH_MARK", "")


def item(ctx, x, i, items):
    def first(sc):
        time.sleep(0.2)
        if x == 5 and CRASH_MARK and not os.path.exists(CRASH_MARK):
            open(CRASH_MARK, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies inside the item, once
        if x == 7:
            raise ValueError("bad item 7")
        return x * x

    a = ctx.step(first, name=f"first{i}", config=ONCE)

    def second(sc):
        time.sleep(0.6)  # a driver killed now leaves this item half done: first step recorded
        return a + 1

    return ctx.step(second, name=f"second{i}")


@durable_execution
def handler(event, ctx):
    r = ctx.map(list(range(12)), item, name="items",
                config=MapConfig(completion_config=CompletionConfig(tolerated_failure_count=3)))
    return r.get_results()
'''


class Report(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.bars: list[dict] = []
        self.markers: list[dict] = []
        self.gaps: list[dict] = []
        self.summary: dict = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if "bar" in cls:
            self.bars.append(a)
        elif ("crash-marker" in cls or "stop-marker" in cls) and "data-pid" in a:
            self.markers.append(a)
        elif "gap" in cls and "data-start" in a:
            self.gaps.append(a)
        elif a.get("id") == "summary":
            self.summary = json.loads(a["data-summary"])


def views(store: str, exec_id: str, tmp_path) -> tuple[str, list[dict], Report]:
    show = run_cli("show", exec_id, store=store, timeout=WAIT_S)
    assert show.returncode == 0, show.stderr
    history = run_cli("history", exec_id, "--json", store=store, timeout=WAIT_S)
    assert history.returncode == 0, history.stderr
    out = str(tmp_path / f"{exec_id}.html")
    assert run_cli("report", exec_id, "-o", out, store=store, timeout=WAIT_S).returncode == 0
    report = Report()
    with open(out, encoding="utf-8") as f:
        report.feed(f.read())
    return show.stdout, json.loads(history.stdout), report


def count(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in:\n{text}"
    return int(found.group(1))


@pytest.fixture
def job(tmp_path):
    path = tmp_path / "crashjob.py"
    path.write_text(JOB)
    return str(path)


def test_a_worker_killed_inside_an_item(job, tmp_path):
    store = str(tmp_path / "store")
    env = {**os.environ, "CRASH_MARK": str(tmp_path / "crashed")}
    run = subprocess.run([sys.executable, "-m", "durable_mp", "--store", store, "run", f"{job}:handler", "--id", "w",
                          "--max-workers", "2"], capture_output=True, text=True, timeout=WAIT_S, env=env)
    assert run.returncode == 0, run.stderr
    assert os.path.exists(env["CRASH_MARK"]), "the worker really was killed"
    show, events, report = views(store, "w", tmp_path)

    # history: one WorkerCrashed event, on item 5, naming the pid that died
    crashed = [e for e in events if e["EventType"] == "WorkerCrashed"]
    assert len(crashed) == 1 and crashed[0]["Name"] == "map-item-5"
    dead_pid = crashed[0]["WorkerCrashedDetails"]["Pid"]
    assert crashed[0]["WorkerCrashedDetails"]["Error"]["Payload"]["ErrorType"].endswith("WorkerCrashedError")
    assert [e["EventId"] for e in events] == list(range(1, len(events) + 1))
    failed_items = [e["Name"] for e in events if e["EventType"] == "ContextFailed" and e.get("SubType") == "MapIteration"]
    assert failed_items == ["map-item-7"]

    # show: the same counts, and item 5 is flagged although it succeeded in the end
    assert count(r"(\d+) worker crash\(es\)", show) == len(crashed)
    assert count(r"(\d+) branch\(es\) re-dispatched", show) == 1
    assert count(r"(\d+) branch\(es\) failed", show) == len(failed_items)
    item5 = next(line for line in show.splitlines() if "map-item-5 " in line)
    assert f"pid {dead_pid}" in item5 and "re-dispatched" in item5

    # report: the same counts; a marker in the dead worker's row; the failed item drawn as a failed bar
    s = report.summary
    assert (s["crashes"], s["redispatched"], s["failed_branches"]) == (len(crashed), 1, len(failed_items))
    assert [m["data-pid"] for m in report.markers] == [str(dead_pid)]
    failed_bar = next(b for b in report.bars if b["data-kind"] == "branch" and b["data-name"] == "map-item-7")
    assert failed_bar["data-status"] == "failed" and float(failed_bar["width"]) >= 3.0
    redispatched = [b["data-name"] for b in report.bars if b.get("data-redispatched") == "1"]
    assert redispatched == ["map-item-5"]


def _half_done_item(store: str) -> bool:
    """Some item has its first step recorded and is not finished: killing the driver now cuts it."""
    try:
        with Store(store, readonly=True) as db:
            ops = db.ops("d")
    except Exception:  # noqa: BLE001 - the store is still being created
        return False
    names = {r.name for r in ops}
    return any(f"first{i}" in names and f"map-item-{i}" not in names for i in range(12))


def _kill_driver_mid_map(job: str, store: str) -> None:
    """Run the job as execution "d" and SIGKILL its driver while an item is half done."""
    proc = subprocess.Popen([sys.executable, "-m", "durable_mp", "--store", store, "run", f"{job}:handler", "--id",
                             "d", "--max-workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + WAIT_S
        while not _half_done_item(store):
            assert time.monotonic() < deadline and proc.poll() is None, "no item was ever half done"
            time.sleep(POLL_S)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.5)  # the killed driver's workers notice and exit


def test_a_driver_killed_mid_map_and_resumed(job, tmp_path):
    store = str(tmp_path / "store")
    _kill_driver_mid_map(job, store)

    show, events, _ = views(store, "d", tmp_path)
    assert "INTERRUPTED" in run_cli("list", store=store, timeout=WAIT_S).stdout
    stopped = [e for e in events if e["EventType"] == "InvocationCompleted"]
    assert len(stopped) == 1 and stopped[0]["InvocationCompletedDetails"]["Error"]["ErrorType"] == "DriverStopped"
    assert "run 1: driver stopped" in show

    resumed = run_cli("resume", "d", store=store, timeout=WAIT_S)
    assert resumed.returncode == 0, resumed.stderr
    show, events, report = views(store, "d", tmp_path)

    # history: two invocations, the first stopped; the resumed run closes the execution
    invocations = [e for e in events if e["EventType"] == "InvocationCompleted"]
    assert len(invocations) == 2
    assert invocations[0]["InvocationCompletedDetails"]["Error"]["ErrorType"] == "DriverStopped"
    assert "Error" not in invocations[1]["InvocationCompletedDetails"]
    assert events[-1]["EventType"] == "ExecutionSucceeded" and events[-2] is invocations[1]
    assert [e["EventId"] for e in events] == list(range(1, len(events) + 1))
    # items whose first step ran before the kill and whose second ran after it
    run2_start = invocations[1]["InvocationCompletedDetails"]["StartTimestamp"]
    reran = set()
    for e in events:
        if e["EventType"] == "StepSucceeded" and e["Name"].startswith("second") and e["EventTimestamp"] >= run2_start:
            first = next(x for x in events if x["EventType"] == "StepSucceeded"
                         and x["Name"] == "first" + e["Name"][len("second"):])
            if first["EventTimestamp"] < run2_start:
                reran.add(e["Name"][len("second"):])
    assert reran, "the driver was killed while an item was half done"

    # show and report count exactly those, and agree on everything else
    assert count(r"(\d+) branch\(es\) started before a resume re-ran after it", show) == len(reran)
    s = report.summary
    assert s["reran_after_resume"] == len(reran) and s["driver_runs"] == 2 and s["runs"] == 2
    assert s["crashes"] == 0 == sum(e["EventType"] == "WorkerCrashed" for e in events)
    assert count(r"(\d+) branch\(es\) failed", show) == s["failed_branches"] == 1
    assert count(r"(\d+) finished in resumed runs", show) == s["ran_in_resumed_runs"]

    # the report draws the time without a driver as a gap, and no driver bar runs through it
    [gap] = report.gaps
    g0, g1 = gap["data-start"], gap["data-end"]
    assert g0 < g1 and len(s["gaps_s"]) == 1 and s["gaps_s"][0] > 0
    for bar in report.bars:
        if bar["data-pid"] == "driver":
            assert bar["data-end"] <= g0 or bar["data-start"] >= g1, bar
    assert any(m["data-pid"] == "driver" for m in report.markers), "the stopped driver is marked"


def test_a_failed_run_fixed_and_resumed_is_not_called_a_stopped_driver(tmp_path):
    """Fix and resume (docs/architecture.md "Running a handler"): run 1 ended FAILED, run 2 resumed it;
    no driver was killed."""
    from durable_mp import durable_execution
    from durable_mp.config import StepConfig
    from durable_mp.inspect.history import build_history
    from durable_mp.retries import RetryStrategyConfig, create_retry_strategy
    from durable_mp.inspect.runs import crash_facts
    from durable_mp.inspect.tree import OpTree
    from durable_mp.exceptions import ExecutionFailedError

    fixed = tmp_path / "fixed"
    store = str(tmp_path / "store")

    @durable_execution
    def handler(event, ctx):
        ctx.step(lambda sc: 1, name="fine")
        once = StepConfig(retry_strategy=create_retry_strategy(RetryStrategyConfig(max_attempts=1)))
        return ctx.step(lambda sc: 2 if fixed.exists() else 1 / 0, name="buggy", config=once)

    with pytest.raises(ExecutionFailedError):
        handler.run({}, execution_id="fix", store=store)
    fixed.touch()
    assert handler.run({}, execution_id="fix", store=store) == 2
    with Store(store, readonly=True) as db:
        ex, ops = db.get_execution("fix"), db.ops("fix")
    events = build_history(ex, ops)
    invocations = [e for e in events if e.event_type == "InvocationCompleted"]
    assert len(invocations) == 2 and all("Error" not in e.details for e in invocations)
    facts = crash_facts(OpTree(ex, ops))
    assert [r.failed for r in facts.runs] == [True, False] and all(r.finished for r in facts.runs)
    assert "stopped" not in facts.sentence()


def test_views_of_a_killed_driver_until_and_after_its_resume(job, tmp_path):
    """Issue 19 §9: after a driver ``kill -9`` the in-flight items' steps hang under their
    items (whose own records were not committed), the report agrees with ``list``
    (INTERRUPTED), its bars end with the killed run, and after the resume the items it
    re-dispatched are not drawn as worker crashes."""
    from durable_mp.core.records import OpType
    from durable_mp.inspect.history import iso
    from durable_mp.inspect.tree import OpTree, is_branch

    store = str(tmp_path / "store")
    _kill_driver_mid_map(job, store)
    with Store(store, readonly=True) as db:
        execution, ops = db.get_execution("d"), db.ops("d")
    orphans = {r.parent_id for r in ops if r.op_type == OpType.STEP and r.parent_id not in {o.op_id for o in ops}}
    assert orphans, "the kill left steps of in-flight items whose item record was never committed"
    last_record = max([r.start_ts for r in ops] + [r.end_ts for r in ops if r.end_ts is not None]
                      + [a.end_ts or a.start_ts for r in ops for a in r.attempts])

    # show: every step hangs under a map item, none at the root of the tree
    tree = OpTree(execution, ops)
    for rec, _depth in tree.walk():
        if rec.op_type == OpType.STEP:
            assert tree.branch_of(rec) is not None, f"{rec.name} is not under its item"
    show = run_cli("show", "d", "--limit", "100", store=store, timeout=WAIT_S).stdout
    roots = [line for line in show.splitlines() if line.startswith(("├─ ", "└─ "))]
    assert roots and not [line for line in roots if " Step " in line or line[3:].startswith("Step")], show
    for parent in orphans:
        assert tree.branch_of(next(r for r in ops if r.parent_id == parent)).op_id == parent
        assert is_branch(tree.ops[parent])

    # report: INTERRUPTED as ``list`` says, and nothing drawn past the killed run's last record
    listed = run_cli("list", store=store, timeout=WAIT_S).stdout
    assert "INTERRUPTED" in listed
    _, _, report = views(store, "d", tmp_path)
    assert report.summary["status"] == "INTERRUPTED"
    with open(tmp_path / "d.html", encoding="utf-8") as f:
        assert '<span class="badge st-INTERRUPTED">INTERRUPTED</span>' in f.read()
    batch = next(b for b in report.bars if b["data-kind"] == "context" and b["data-name"] == "items")
    assert batch["data-end"] <= iso(last_record), (batch, iso(last_record))
    late = [b for b in report.bars if b["data-end"] > iso(last_record)]
    assert not late, late

    # after the resume: re-dispatches after the driver kill are no worker crashes
    resumed = run_cli("resume", "d", store=store, timeout=WAIT_S)
    assert resumed.returncode == 0, resumed.stderr
    show, _, report = views(store, "d", tmp_path)
    s = report.summary
    crashes_drawn = [m for m in report.markers if m["data-kind"] == "crash"]
    assert len(crashes_drawn) == s["crashes"] + s["kills"] == 0, crashes_drawn
    stopped = [m for m in report.markers if m["data-kind"] == "stopped" and m["data-pid"] != "driver"]
    assert len(stopped) >= 1, "the workers stopped with the driver are still marked, as stops"
