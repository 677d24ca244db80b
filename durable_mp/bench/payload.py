"""``payload``: branches that return big numpy arrays (64 x 1 MB, 16 x 16 MB of float64).

Each array is made in the branch, so what is measured is moving results back: for
durable_mp that includes pickling the result, the pipe, and committing every array to
the store (the checkpoint) before the handler sees it.  Every variant summarises the
arrays it got back (shape, ends, a strided sum) inside its timing, which also checks them.
Target: durable_mp >= 1.0x PPE's MB/s for the 16 MB arrays.
"""

from __future__ import annotations

from durable_mp import durable_execution
from durable_mp.bench.core import (Runner, Sample, ScenarioResult, Target, Variant, check, joblib_or_none,
                                   joblib_parallel, ppe, run_durable, stop_helpers, timed, workers)

NAME = "payload"
TITLE = "numpy results made in the branches, checkpoint included"

MB = 1 << 20
FLOAT64 = 8
STRIDE = 1024


def params(quick: bool) -> dict:
    if quick:
        return {"cases": [[1, 16], [16, 4]]}  # [MB per array, arrays]
    return {"cases": [[1, 64], [16, 16]]}


def make_array(job: tuple[int, int]):
    """A float64 array of ``mb`` MiB whose values encode ``index`` (a fresh allocation)."""
    import numpy as np

    mb, index = job
    return np.arange(mb * MB // FLOAT64, dtype=np.float64) + index


def summary(arr) -> tuple:
    return (arr.dtype.str, arr.shape, float(arr[0]), float(arr[-1]), float(arr[::STRIDE].sum()))


def expected_summary(mb: int, index: int) -> tuple:
    n = mb * MB // FLOAT64
    picked = range(0, n, STRIDE)
    total = float(sum(picked)) + index * len(picked)
    return ("<f8", (n,), float(index), float(n - 1 + index), total)


@durable_execution
def map_handler(event: dict, context) -> list[tuple]:
    mb = event["mb"]
    result = context.map(list(range(event["count"])), lambda ctx, index, i, inputs: make_array((mb, index)),
                         name=f"arrays-{mb}MB")
    result.throw_if_error()
    return [summary(a) for a in result.get_results()]


def _cases(p: dict, joblib, n: int) -> list[Variant]:
    variants = []
    for mb, count in p["cases"]:
        jobs = [(mb, i) for i in range(count)]
        expected = [expected_summary(mb, i) for i in range(count)]
        group = f"{count} x {mb} MB"
        work = dict(work=float(mb * count), unit="MB", group=group)

        def pool(jobs=jobs, expected=expected) -> Sample:
            def go():
                with ppe(n) as ex:
                    return [summary(a) for a in ex.map(make_array, jobs)]
            wall, out = timed(go)
            check(out == expected, "ProcessPoolExecutor arrays differ")
            return Sample(wall)

        def with_joblib(jobs=jobs, expected=expected) -> Sample:
            wall, out = timed(lambda: [summary(a) for a in
                                       joblib_parallel(joblib, n)(joblib.delayed(make_array)(j) for j in jobs)])
            check(out == expected, "joblib arrays differ")
            return Sample(wall)

        def durable(mb=mb, count=count, expected=expected) -> Sample:
            wall, out, _ = run_durable(map_handler, {"mb": mb, "count": count}, NAME, max_workers=n)
            check(out == expected, "durable_mp arrays differ")
            return Sample(wall)

        variants += [
            Variant("ppe", pool, pool if not variants else None, **work, baseline=True,
                    note="executor started inside the timing"),
            Variant("joblib", with_joblib if joblib else None, with_joblib if joblib and not variants else None,
                    **work, skipped=None if joblib else "joblib is not installed"),
            Variant("durable_mp.map", durable, durable if not variants else None, **work,
                    note="each array committed to LMDB"),
        ]
    return variants


def run(p: dict, runner: Runner) -> ScenarioResult:
    n = workers()
    try:
        import numpy  # noqa: F401
    except ImportError:
        res = ScenarioResult(NAME, TITLE, p)
        res.notes.append("skipped: numpy is not installed")
        return res
    joblib = joblib_or_none()
    try:
        rows = runner.measure(NAME, _cases(p, joblib, n))
    finally:
        stop_helpers()
    res = ScenarioResult(NAME, TITLE, {**p, "workers": n}, rows)
    for mb, count in p["cases"]:
        group = f"{count} x {mb} MB"
        ratio = res.compare("ppe", "durable_mp.map", group)  # MB/s ratio = inverse wall ratio
        res.facts[f"{group}: durable_mp MB/s / ppe MB/s"] = None if ratio is None else round(ratio, 3)
        if mb >= 16:
            res.targets.append(Target(f"payload: {group} durable_mp MB/s / ppe MB/s", ratio, 1.0, ">=", "x"))
    return res
