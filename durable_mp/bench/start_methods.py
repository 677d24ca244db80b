"""``start``: what each worker start method (fork, forkserver, spawn) costs, side by side.

Two jobs per method, interleaved by the runner: a one-item map (the time to the first
result: store, worker start, one item, last commit, shutdown) and a map over many
trivial items.  The difference between the two, per item, is the per-item overhead once
the workers run.  README "Start methods" chooses the default from these numbers.
"""

from __future__ import annotations

import multiprocessing

from durable_mp import durable_execution
from durable_mp.bench.core import Runner, Sample, ScenarioResult, Variant, check, run_durable, workers
from durable_mp.engine.start import START_METHODS, default_start_method

NAME = "start"
TITLE = "worker start methods: time to the first result and per-item overhead"

FIRST = "first result (1-item map)"
MANY = "many-item map"


def params(quick: bool) -> dict:
    return {"items": 2_000 if quick else 10_000}


def map_item(ctx, x: int, index: int, inputs: list) -> int:
    return 2 * x


@durable_execution
def map_handler(event: dict, context) -> list[int]:
    result = context.map(list(range(event["items"])), map_item, name="start")
    result.throw_if_error()
    return result.get_results()


def methods() -> list[str]:
    """The start methods this platform has, the default first (it is each group's baseline)."""
    have = [m for m in START_METHODS if m in multiprocessing.get_all_start_methods()]
    default = default_start_method()
    return [default] + [m for m in have if m != default]


def run(p: dict, runner: Runner) -> ScenarioResult:
    n = workers()
    items = p["items"]

    def job(method: str, count: int):
        def go() -> Sample:
            wall, out, _ = run_durable(map_handler, {"items": count}, NAME, max_workers=n, start_method=method)
            check(out == [2 * x for x in range(count)], f"durable_mp map results differ under {method}")
            return Sample(wall)
        return go

    variants = []
    for method in methods():
        base = method == default_start_method()
        note = "default" if base else None
        variants.append(Variant(method, job(method, 1), job(method, 1), work=1, unit="items", baseline=base,
                                group=FIRST, note=note))
        variants.append(Variant(method, job(method, items), job(method, 100), work=items, unit="items",
                                baseline=base, group=MANY, note=note))
    rows = runner.measure(NAME, variants)
    res = ScenarioResult(NAME, TITLE, {**p, "workers": n}, rows)
    for method in methods():
        first, many = res.row(method, FIRST), res.row(method, MANY)
        if first and many and first.median is not None and many.median is not None:
            res.facts[f"{method}: time to first result"] = f"{first.median * 1e3:.0f} ms"
            per_item = max(0.0, many.median - first.median) / max(1, items - 1)
            res.facts[f"{method}: per-item overhead"] = f"{per_item * 1e6:.1f} us"
    return res
