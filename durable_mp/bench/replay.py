"""``replay``: re-running a finished map execution, and resuming one killed halfway.

Each repeat runs a map of ``items`` trivial items to the end in a fresh process, runs it
again (a SUCCEEDED execution returns its stored result: time to result), then runs a
second execution and kills its driver and workers with SIGKILL at about half of the
fresh run's wall time, and runs it again.  The item function writes ``time.time()`` when
a worker starts its first item, so the time from ``run()`` to the first dispatch of an
unfinished item is measured from outside the engine.  Targets (issue #11): both under 2 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from durable_mp.bench.core import BenchError, Row, Runner, ScenarioResult, Target, count_records, fresh_store, workers
from durable_mp.bench.growth import MB, job

NAME = "replay"
TITLE = "replay at scale: re-run of a finished map, resume of a half-finished one"

TARGET_SECONDS = 2.0
MAX_REPEATS = 2  # one repeat runs the map twice and a half; a million items take half a minute


def params(quick: bool) -> dict:
    # the kill comes at this fraction of the fresh run's wall time (start-up included): about half the items
    return {"items": 100_000 if quick else 1_000_000, "kill_at": 0.6, "repeats": 1 if quick else MAX_REPEATS}


def _killed_halfway(path: str, execution_id: str, items: int, n: int, after: float) -> None:
    cmd = [sys.executable, "-m", "durable_mp.bench.replay_job", "run", str(items), str(n), path, execution_id]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=os.path.dirname(path))
    try:
        proc.wait(timeout=after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, all at once, as a power cut would
        proc.wait()
    else:
        raise BenchError(f"the run to be killed ended before its kill after {after:.2f} s (exit {proc.returncode})")


def run(p: dict, runner: Runner) -> ScenarioResult:
    n, items = workers(), p["items"]
    fresh, rerun, first, resumed = [], [], [], []
    done_fraction = []
    for rep in range(min(runner.repeats, p["repeats"])):
        with fresh_store(NAME) as (path, execution_id):
            cwd = os.path.dirname(path)
            runner.progress.show(f"{NAME}: fresh run of {items:,} items  repeat {rep + 1}")
            fresh.append(job("run", str(items), str(n), path, execution_id, cwd=cwd))
            runner.progress.show(f"{NAME}: re-run of the finished execution  repeat {rep + 1}")
            rerun.append(job("run", str(items), str(n), path, execution_id, cwd=cwd))
            half_id = execution_id + "-half"
            runner.progress.show(f"{NAME}: killing a run halfway  repeat {rep + 1}")
            _killed_halfway(path, half_id, items, n, p["kill_at"] * fresh[-1]["wall"])
            ended = count_records(path, half_id)["by_kind"].get("MapIteration:SUCCEEDED", 0)
            done_fraction.append(ended / items)
            marks = os.path.join(cwd, "marks")
            runner.progress.show(f"{NAME}: resuming it  repeat {rep + 1}")
            data = job("run", str(items), str(n), path, half_id, marks, cwd=cwd)
            resumed.append(data)
            if not os.path.exists(marks):
                raise BenchError("the resumed run dispatched no item: the kill came after the map had ended")
            with open(marks) as f:
                first.append({"wall": min(float(line) for line in f) - data["t_start"], "cpu": data["cpu"],
                              "peak_rss": data["peak_rss"]})

    def row(name: str, runs: list[dict], baseline: bool = False, note: str | None = None) -> Row:
        info = [{"cpu_s": r["cpu"], "peak_rss_mb": r["peak_rss"] / MB} for r in runs]
        return Row(name, "", [r["wall"] for r in runs], items, "items", baseline, note=note, info=info)

    res = ScenarioResult(NAME, TITLE, {**p, "workers": n})
    res.rows = [row("fresh run", fresh, True),
                row("re-run of finished", rerun, note="stored result returned"),
                row("resume: first dispatch", first, note="run() to the first unfinished item's start"),
                row("resume: total", resumed, note="run() to the result, half the items replayed")]
    res.facts["items already finished when the driver was killed (fraction)"] = [round(f, 3) for f in done_fraction]
    for r in res.rows:
        res.facts[f"{r.variant}: driver CPU s / peak RSS MB (median)"] = (
            _round(r.info_median("cpu_s"), 2), _round(r.info_median("peak_rss_mb"), 1))
    res.targets.append(Target(f"replay: re-run of a finished {items:,}-item map (s)", res.rows[1].median,
                              TARGET_SECONDS, "<="))
    res.targets.append(Target(f"replay: half-finished {items:,}-item map, first dispatch (s)", res.rows[2].median,
                              TARGET_SECONDS, "<="))
    return res


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
