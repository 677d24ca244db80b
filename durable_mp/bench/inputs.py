"""``inputs``: a map over large numpy inputs with light work (issue 23 target 3).

200 rows of 1 MiB each (float64), every item a strided sum of its row: what is measured
is getting the inputs to the workers.  ProcessPoolExecutor pickles each row into the pipe
of the worker that runs it; joblib likewise (memmapping off, as in every scenario);
durable_mp's map hands every item the whole input list (the reference's contract), so the
batch payload holds all rows: written once into a memory file that each worker maps
(``engine.wire.Shared``), the rows out of band (views, not copies).  ``durable_mp.map()``
also hashes every row for its item keys (the identity that makes a re-run resume).

The physical limit beside it: the same rows through one raw Pipe to a reading child.
Target: durable_mp wall <= 1.2x PPE's.
"""

from __future__ import annotations

from typing import Any

from durable_mp import durable_execution
from durable_mp.bench import limits
from durable_mp.bench.core import (
    Runner,
    Sample,
    ScenarioResult,
    Target,
    Variant,
    check,
    joblib_or_none,
    joblib_parallel,
    ppe,
    run_durable,
    run_map,
    skipped_without_numpy,
    stop_helpers,
    timed,
    workers,
)

NAME = "inputs"
TITLE = "map over large numpy inputs, light work"
MB = 1 << 20
FLOAT64 = 8
STRIDE = 1024
TARGET_VS_PPE = 1.2


def params(quick: bool) -> dict:
    return {"rows": 50 if quick else 200, "row_mb": 1}


def make_rows(count: int, row_mb: int) -> list:
    import numpy as np

    return [np.full(row_mb * MB // FLOAT64, float(i)) for i in range(count)]


def light(row) -> float:
    """The light work: a strided sum (reads one value in ``STRIDE``)."""
    return float(row[::STRIDE].sum())


def light_item(ctx, row, index: int, inputs: list) -> float:
    return light(row)


def map_handler(rows: list) -> Any:
    """A handler mapping over ``rows`` (closed over: an event would be stored with the execution)."""
    @durable_execution
    def handler(event: None, context) -> list[float]:
        result = context.map(rows, light_item, name="inputs")
        result.throw_if_error()
        return result.get_results()
    return handler


def run(p: dict, runner: Runner) -> ScenarioResult:
    skipped = skipped_without_numpy(NAME, TITLE, p)
    if skipped is not None:
        return skipped
    n = workers()
    rows = make_rows(p["rows"], p["row_mb"])
    expected = [light(r) for r in rows]
    joblib = joblib_or_none()
    handler = map_handler(rows)
    mb = float(p["rows"] * p["row_mb"])

    def pool() -> Sample:
        def go():
            with ppe(n) as ex:
                return list(ex.map(light, rows))
        wall, out = timed(go)
        check(out == expected, "ProcessPoolExecutor results differ")
        return Sample(wall)

    def with_joblib() -> Sample:
        wall, out = timed(lambda: joblib_parallel(joblib, n)(joblib.delayed(light)(r) for r in rows))
        check(list(out) == expected, "joblib results differ")
        return Sample(wall)

    def pipe() -> Sample:
        return Sample(limits.pipe_seconds(rows))

    def durable() -> Sample:
        wall, out, _ = run_durable(handler, None, NAME, max_workers=n)
        check(out == expected, "durable_mp map results differ")
        return Sample(wall)

    def public_map() -> Sample:
        wall, out = run_map(light, rows, NAME, max_workers=n)
        check(list(out) == expected, "durable_mp.map() results differ")
        return Sample(wall)

    try:
        measured = runner.measure(NAME, [
            Variant("ppe", pool, pool, work=mb, unit="MB", baseline=True,
                    note="executor.map, started inside the timing"),
            Variant("joblib", with_joblib if joblib else None, with_joblib if joblib else None, work=mb, unit="MB",
                    skipped=None if joblib else "joblib is not installed", note="loky reused, memmapping off"),
            Variant("pipe", pipe, pipe, work=mb, unit="MB",
                    note="limit: the same rows through one raw Pipe to a reader"),
            Variant("durable_mp.map", durable, durable, work=mb, unit="MB",
                    note="context.map, every item checkpointed"),
            Variant("durable_mp.map()", public_map, public_map, work=mb, unit="MB",
                    note="the public call: every row hashed for its item key"),
        ])
    finally:
        stop_helpers()
    res = ScenarioResult(NAME, TITLE, {**p, "workers": n}, measured)
    pipe_row = res.row("pipe")
    for name in ("durable_mp.map", "durable_mp.map()"):
        row = res.row(name)
        res.facts[f"{name} / ppe wall"] = _round(res.compare(name, "ppe"))
        res.facts[f"{name} / pipe limit wall"] = limits.ratio(row.median if row else None,
                                                                pipe_row.median if pipe_row else None)
        res.targets.append(Target(f"inputs: {name} wall / ppe wall", res.compare(name, "ppe"), TARGET_VS_PPE, "<=",
                                  "x"))
    return res


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
