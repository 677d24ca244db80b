"""Smoke tests of ``python -m durable_mp.bench``: every scenario at a tiny size, result structure only.

Never a timing assertion: these run on loaded CI machines.  What is checked is that each
scenario runs, checks its own results, and reports rows, targets and JSON in the shape
the README documents, and that no store is left in the working directory.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import time

import psutil
import pytest

from durable_mp import bench
from durable_mp.bench import SCENARIOS, Runner, report, run_scenario
from durable_mp.bench.cli import main

pytestmark = pytest.mark.timeout(300)

TINY = {
    "seed": {"scale": 0.02},
    "cpu": {"branches": 4, "branch_ms": 2},
    "overhead": {"items": 300},
    "payload": {"cases": [[1, 2], [2, 2]]},
    "inputs": {"rows": 4, "row_mb": 1},
    "recovery": {"branches": 3, "step_ms": 5, "driver_branches": 6, "driver_step_ms": 60},
    "memory": {"items": 3000, "skip": False},
    "start": {"items": 200},
    "growth": {"items": [300, 3000], "result_mb": [1, 2], "branches": 1, "repeats": 1},
    "replay": {"items": 20_000, "kill_at": 0.6, "repeats": 1},
}


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """conftest's check, except for the resource trackers of multiprocessing and loky.

    ``ProcessPoolExecutor`` and joblib (the baselines) start one per process; it exits with
    the test process, and stopping it early makes loky report joblib's temporary folders as
    leaked.  Every other child (durable_mp workers, loky workers, job subprocesses) must be
    gone.
    """
    yield
    me = psutil.Process(os.getpid())
    deadline = time.monotonic() + 5.0
    alive = []
    while time.monotonic() < deadline:
        alive = [p for p in _children(me) if "resource_tracker" not in _cmdline(p)]
        if not alive:
            break
        time.sleep(0.05)
    for proc in alive:
        proc.kill()
    assert not alive, f"processes left behind: {[(p.pid, _cmdline(p)) for p in alive]}"


def _children(me):
    out = []
    for proc in me.children(recursive=True):
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            pass
    return out


def _cmdline(proc) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


@pytest.fixture(autouse=True)
def in_tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield
    assert not os.path.exists(tmp_path / ".durable_mp"), "the benchmark must not leave a store in the cwd"


def _runner() -> Runner:
    return Runner(1, warmup=True)


def _repeats(name: str) -> int:
    """Samples per variant with ``Runner(1)``: one, times the scenario's own factor if it has one."""
    return getattr(SCENARIOS[name], "REPEAT_FACTOR", 1)


def _check_structure(res) -> None:
    assert res.error is None, res.error
    assert res.rows, "a scenario reports at least one row"
    for row in res.rows:
        if row.skipped:
            assert row.samples == []
            continue
        assert len(row.samples) == _repeats(res.name) and all(s > 0 for s in row.samples)
        assert min(row.samples) <= row.median <= max(row.samples)
        assert len(row.info) == len(row.samples)
    groups = {row.group for row in res.rows}
    for group in groups:
        base = res.baseline(group)
        assert base is not None, f"group {group!r} has no baseline"
        assert res.ratio(base) == pytest.approx(1.0)
    for target in res.targets:
        assert target.cmp in (">=", "<=")
        assert target.measured is not None, target.name
        assert target.met in (True, False)
    text = report.text_table(res)
    assert res.name in text and all(row.variant in text for row in res.rows)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_runs_at_a_tiny_size(name):
    res = run_scenario(name, _runner(), params=TINY[name])
    _check_structure(res)
    doc = report.to_json([res], {"date": report.now_iso(), "machine": report.machine()})
    json.dumps(doc)  # machine-readable all the way down
    assert doc["ok"] is True
    assert doc["scenarios"][name]["rows"][0]["samples_s"]


def test_scenario_specific_measurements():
    over = run_scenario("overhead", _runner(), params=TINY["overhead"])
    dmp = over.row("durable_mp.map")
    assert dmp.info[0]["item_records"] == 300  # one checkpoint per item
    assert dmp.info[0]["records"] >= 301  # plus the map itself
    assert over.targets[0].unit == "items/s"
    # CPU per item of the driver and of its workers (reaped when the pool closes): both did work
    assert dmp.info[0]["driver"] > 0 and dmp.info[0]["workers"] > 0
    assert over.facts["durable_mp: workers CPU per item, start-up included (us, median)"] > 0

    rec = run_scenario("recovery", _runner(), params=TINY["recovery"])
    crashed = rec.row("durable_mp, 1 worker killed", "worker SIGKILL")
    assert crashed.info[0]["branches_rerun"] >= 1
    assert crashed.info[0]["redispatch_ms"] >= 0
    assert rec.row("ppe, 1 worker killed", "worker SIGKILL").info[0]["tasks_lost"] >= 1
    resumed = rec.row("resume after driver kill", "driver SIGKILL").info[0]
    assert {"done_at_kill", "in_flight_at_kill", "committed_at_kill", "rerun", "rerun_committed"} <= set(resumed)


def test_quick_memory_is_skipped_and_says_so():
    res = run_scenario("memory", _runner(), quick=True)
    assert res.error is None and res.rows == [] and res.targets == []
    assert any("skipped" in note for note in res.notes)


def test_joblib_missing_is_reported_as_skipped(monkeypatch):
    from durable_mp.bench import overhead

    monkeypatch.setattr(overhead, "joblib_or_none", lambda: None)
    res = run_scenario("overhead", _runner(), params=TINY["overhead"])
    row = res.row("joblib")
    assert row.skipped and "not installed" in row.skipped and row.samples == []
    assert "skipped" in report.text_table(res)


def test_a_wrong_result_is_an_error_not_a_crash(monkeypatch):
    from durable_mp.bench import overhead

    # the PPE baseline now computes the wrong thing (a partial of a builtin pickles by value)
    monkeypatch.setattr(overhead, "double", functools.partial(operator.mul, 3))
    res = run_scenario("overhead", _runner(), params=TINY["overhead"])
    assert res.error and "BenchError" in res.error


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = main(["--only", "overhead", "--repeats", "1", "--no-progress", "--json", str(out_json),
                 "--markdown", str(out_md)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "== overhead" in printed and "== targets ==" in printed
    doc = json.loads(out_json.read_text())
    assert doc["ok"] is True and doc["repeats"] == 1
    assert {"cpu_count", "cpu_model", "python", "durable_mp"} <= set(doc["machine"])
    assert doc["date"] and list(doc["scenarios"]) == ["overhead"]
    rows = doc["scenarios"]["overhead"]["rows"]
    assert {r["variant"] for r in rows} >= {"ppe", "durable_mp.map"}
    assert all(len(r["samples_s"]) == _repeats("overhead") for r in rows if not r["skipped"])
    assert doc["targets"][0]["name"].startswith("overhead:")
    assert "| target | measured | goal | status |" in out_md.read_text()


def test_cli_progress_goes_to_stderr(capsys):
    assert main(["--only", "seed", "--quick", "--repeats", "1", "--no-warmup"]) == 0
    captured = capsys.readouterr()
    assert "[bench" in captured.err and "seed" in captured.err
    assert "[bench" not in captured.out


def test_cli_rejects_unknown_scenarios_and_bad_repeats():
    with pytest.raises(SystemExit) as info:
        main(["--only", "nope"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["--repeats", "0"])
    assert info.value.code == 2


def test_scenarios_are_registered_in_order():
    assert list(bench.SCENARIOS) == ["seed", "cpu", "overhead", "payload", "inputs", "recovery", "memory", "start",
                                        "growth", "replay"]
    for module in bench.SCENARIOS.values():
        assert isinstance(module.params(True), dict) and isinstance(module.params(False), dict)
