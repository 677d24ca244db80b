"""``growth``: how wall time, driver CPU and driver peak RSS grow with the number of map items
(10k → 100k → 1M) and with the size of a result (1 → 64 MB).

Every run is a fresh Python process (``replay_job``), so its CPU time (user + sys of the
driver alone, not its workers) and its peak RSS (``VmHWM``) are its own.  The growth
factor per 10× items (per 4× MB) is ``wall(bigger) / wall(smaller)``: linear growth is
10 (4), better is less.  Target: a 1M-item map keeps the driver under 600 MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from durable_mp.bench.core import BenchError, Row, Runner, ScenarioResult, Target, check, fresh_store, workers

NAME = "growth"
TITLE = "growth of wall, driver CPU and driver peak RSS with items and result size"

MB = 1 << 20
RSS_LIMIT_MB = 600
JOB_TIMEOUT_SECONDS = 1200
MAX_REPEATS = 3
BIG_REPEATS = 2  # runs of a million items take half a minute each


def params(quick: bool) -> dict:
    if quick:
        return {"items": [10_000, 100_000], "result_mb": [1, 4, 16, 64], "branches": 1, "repeats": 1}
    return {"items": [10_000, 100_000, 1_000_000], "result_mb": [1, 4, 16, 64], "branches": 4,
            "repeats": MAX_REPEATS}


def job(*args: str, cwd: str | None = None) -> dict:
    """Run ``replay_job`` with ``args`` in a fresh process; its JSON line."""
    cmd = [sys.executable, "-m", "durable_mp.bench.replay_job", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_SECONDS, cwd=cwd)
    if out.returncode != 0:
        raise BenchError(f"replay job {args[:2]} failed ({out.returncode}): {out.stderr[-2000:]}")
    data: dict = json.loads(out.stdout.strip().splitlines()[-1])
    check(data["ok"], f"replay job {args[:2]} returned a wrong result")
    return data


def one(mode: str, count: int, n: int, mb: int = 1) -> dict:
    with fresh_store(NAME) as (path, execution_id):
        return job(mode, str(count), str(n), path, execution_id, "", str(mb), cwd=os.path.dirname(path))


def _row(name: str, group: str, runs: list[dict], work: float, unit: str, baseline: bool) -> Row:
    info = [{"cpu_s": r["cpu"], "peak_rss_mb": r["peak_rss"] / MB} for r in runs]
    return Row(name, group, [r["wall"] for r in runs], work, unit, baseline, info=info)


def _factor(rows: list[Row], key: str | None) -> list[float | None]:
    def value(row: Row) -> float | None:
        return row.median if key is None else row.info_median(key)
    out = []
    for small, big in zip(rows, rows[1:], strict=False):
        a, b = value(small), value(big)
        out.append(None if not a or b is None else round(b / a, 2))
    return out


def run(p: dict, runner: Runner) -> ScenarioResult:
    n = workers()
    repeats = min(runner.repeats, p["repeats"])
    res = ScenarioResult(NAME, TITLE, {**p, "workers": n})
    item_rows = []
    for i, count in enumerate(p["items"]):
        reps = repeats if count < 1_000_000 else min(repeats, BIG_REPEATS)
        runs = []
        for rep in range(reps):
            runner.progress.show(f"{NAME}: {count:,} items  repeat {rep + 1}/{reps}")
            runs.append(one("run", count, n))
        item_rows.append(_row(f"{count:,} items", "items", runs, count, "items", i == 0))
    mb_rows = []
    for i, mb in enumerate(p["result_mb"]):
        runs = []
        for rep in range(repeats):
            runner.progress.show(f"{NAME}: {p['branches']} x {mb} MB results  repeat {rep + 1}/{repeats}")
            runs.append(one("big", p["branches"], n, mb))
        mb_rows.append(_row(f"{p['branches']} x {mb} MB", "results", runs, p["branches"] * mb, "MB", i == 0))
    res.rows = item_rows + mb_rows
    for rows, what in ((item_rows, "per 10x items"), (mb_rows, "per 4x MB")):
        res.facts[f"wall growth {what}"] = _factor(rows, None)
        res.facts[f"driver CPU growth {what}"] = _factor(rows, "cpu_s")
        res.facts[f"driver peak RSS growth {what}"] = _factor(rows, "peak_rss_mb")
        for row in rows:
            res.facts[f"{row.variant}: driver CPU s / peak RSS MB (median)"] = (
                _round(row.info_median("cpu_s"), 2), _round(row.info_median("peak_rss_mb"), 1))
    factors = [f for f in res.facts["wall growth per 10x items"] if f is not None]
    res.targets.append(Target("growth: wall per 10x items (max)", max(factors) if factors else None, 10, "<=", "x"))
    cpu = [f for f in res.facts["driver CPU growth per 10x items"] if f is not None]
    res.targets.append(Target("growth: driver CPU per 10x items (max)", max(cpu) if cpu else None, 10, "<=", "x"))
    big = next((r for r in item_rows if r.work == 1_000_000), None)
    if big is None:
        res.notes.append("the 600 MB driver target is for 1,000,000 items, measured only in a full run")
    else:
        peak = max(s["peak_rss_mb"] for s in big.info)
        res.targets.append(Target("growth: driver peak RSS, 1M-item map (MB, max)", peak, RSS_LIMIT_MB, "<=", "MB"))
    return res


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
