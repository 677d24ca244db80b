"""``memory``: the driver's peak RSS for a map over 1,000,000 small items (full runs only).

Each run is a fresh Python process (``memory_job``), so its peak RSS (``getrusage``) is not
inflated by what the benchmark did before.  ``ProcessPoolExecutor.map`` with a good
chunksize is the baseline.  Target (issue #11, 5): durable_mp driver peak < 600 MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from durable_mp.bench.core import (BenchError, Runner, Sample, ScenarioResult, Target, Variant, check, fresh_store,
                                   workers)

NAME = "memory"
TITLE = "driver peak RSS, map over many small items"

MB = 1 << 20
RSS_LIMIT_MB = 600
MAX_REPEATS = 3  # each durable_mp run takes many seconds; three samples are plenty for a peak
JOB_TIMEOUT_SECONDS = 900


def params(quick: bool) -> dict:
    return {"items": 1_000_000, "skip": quick}


def _job(mode: str, items: int, n: int, store: str | None, cwd: str | None) -> dict:
    cmd = [sys.executable, "-m", "durable_mp.bench.memory_job", mode, str(items), str(n)]
    if store is not None:
        cmd.append(store)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_SECONDS, cwd=cwd)
    if out.returncode != 0:
        raise BenchError(f"memory job ({mode}) failed ({out.returncode}): {out.stderr[-2000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    check(data["ok"], f"memory job ({mode}) returned {data['result']!r}")
    return data


def _sample(data: dict) -> Sample:
    return Sample(data["wall"], {"peak_rss_mb": data["peak_rss"] / MB, "rss_before_mb": data["rss_before"] / MB,
                                 "worker_peak_rss_mb": data["worker_peak_rss"] / MB})


def run(p: dict, runner: Runner) -> ScenarioResult:
    if p.get("skip"):
        res = ScenarioResult(NAME, TITLE, p)
        res.notes.append("skipped with --quick (a full run maps 1,000,000 items)")
        return res
    n, items = workers(), p["items"]

    def durable() -> Sample:
        with fresh_store(NAME) as (path, _execution_id):
            return _sample(_job("durable_mp", items, n, path, os.path.dirname(path)))

    work = dict(work=items, unit="items")
    rows = runner.measure(NAME, [
        Variant("ppe", lambda: _sample(_job("ppe", items, n, None, None)), **work, baseline=True),
        Variant("durable_mp.map", durable, **work, note="every item checkpointed"),
    ], repeats=min(runner.repeats, MAX_REPEATS))
    res = ScenarioResult(NAME, TITLE, {**p, "workers": n}, rows)
    for row in rows:
        res.facts[f"{row.variant}: driver peak RSS (MB, median)"] = _round(row.info_median("peak_rss_mb"))
        res.facts[f"{row.variant}: driver RSS before the map (MB)"] = _round(row.info_median("rss_before_mb"))
        res.facts[f"{row.variant}: worker peak RSS (MB, median)"] = _round(row.info_median("worker_peak_rss_mb"))
    dmp = res.row("durable_mp.map")
    peak = max((s["peak_rss_mb"] for s in dmp.info), default=None)
    res.targets.append(Target("memory: durable_mp driver peak RSS (MB, max)", peak, RSS_LIMIT_MB, "<=", "MB"))
    return res


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
