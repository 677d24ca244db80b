"""``start``: what each worker start method (fork, forkserver, spawn) costs, side by side.

Three things per method, interleaved by the runner:

* **time to the first branch** (issue #11 target 3, issue #23 target 4): from entering
  ``handler.run`` to the moment the first map item's body starts in a worker.  The item
  returns ``time.time()`` (one clock for every process on Linux), the bench takes
  ``time.time()`` just before ``run``.  Measured for a handler that maps at once, under
  each start method against a ``ProcessPoolExecutor`` under the *same* method (from
  creating it to its first task's body; multiprocessing's fork server is stopped after
  each run, so every run pays its start, as durable_mp's per-pool server does), and for
  one that first runs two cheap steps in the driver (the workers can start meanwhile),
  against PPE under ``fork``.  Both sides' first task lives in ``bench.items``, which
  imports nothing, so a spawned process pays for the pool, not for the bench.  Each of
  these runs also reports its whole-job time (store open, worker start, one item, last
  commit, shutdown) beside it;
* a map over many trivial items; the difference to the one-item job, per item, is the
  per-item overhead once the workers run.

README "Start methods" chooses the default from these numbers.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

from durable_mp import durable_execution
from durable_mp.bench import items
from durable_mp.bench.core import (
    Runner,
    Sample,
    ScenarioResult,
    Target,
    Variant,
    check,
    fresh_store,
    run_durable,
    workers,
)
from durable_mp.engine.start import START_METHODS, default_start_method

NAME = "start"
TITLE = "worker start methods: time to the first branch and per-item overhead"

FIRST = "first branch starts (map at once)"
FIRST_STEPS = "first branch starts (2 driver steps first)"
MANY = "many-item map"
PPE = "ppe"  # each first-branch group's baseline: ProcessPoolExecutor, created and given one task
DRIVER_STEPS = 2
TARGET_SECONDS = 0.020  # issue #11 target 3, for the default start method
TARGET_VS_PPE = 1.5  # issue #23 target 4: first branch / PPE's first task, under forkserver and spawn
DURABLE = "durable_mp"


def params(quick: bool) -> dict:
    return {"items": 2_000 if quick else 10_000}


def map_item(ctx, x: int, index: int, inputs: list) -> int:
    return 2 * x


def _cheap_step(step_ctx) -> int:
    return 1


@durable_execution
def map_handler(event: dict, context) -> list[int]:
    result = context.map(list(range(event["items"])), map_item, name="start")
    result.throw_if_error()
    return result.get_results()


@durable_execution
def first_handler(event: dict, context) -> float:
    """A one-item map (after ``event["steps"]`` cheap driver steps); returns when its item started."""
    for k in range(event["steps"]):
        context.step(_cheap_step, name=f"prepare-{k}")
    result = context.map([0], items.stamp_item, name="first")
    result.throw_if_error()
    return float(result.get_results()[0])


def methods() -> list[str]:
    """The start methods this platform has, the default first."""
    have = [m for m in START_METHODS if m in multiprocessing.get_all_start_methods()]
    default = default_start_method()
    return [default] + [m for m in have if m != default]


def first_branch(method: str, steps: int, n: int) -> Sample:
    """Seconds from entering ``run`` to the first item's body; the whole run in ``info``."""
    with fresh_store(NAME) as (path, execution_id):
        t0 = time.time()
        started = first_handler.run({"steps": steps}, store=path, execution_id=execution_id, max_workers=n,
                                    start_method=method, progress=False)
        whole = time.time() - t0
    check(t0 < started <= t0 + whole, f"the first branch under {method} did not start during the run")
    return Sample(started - t0, {"whole_s": whole})


def ppe_first_task(method: str, n: int) -> Sample:
    """The same moment for ``ProcessPoolExecutor``: creating it, submitting one task, its body starting.

    Under ``forkserver`` multiprocessing's server outlives the pool; it is stopped after
    the run, so that the next run starts one, as every durable_mp pool does.
    """
    t0 = time.time()
    try:
        with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context(method)) as ex:
            started = ex.submit(items.stamp).result()
        whole = time.time() - t0
    finally:
        if method == "forkserver":
            _stop_multiprocessing_forkserver()
    return Sample(started - t0, {"whole_s": whole})


def _stop_multiprocessing_forkserver() -> None:
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)  # private, but what its tests use
    if stop is not None:
        stop()


def bytecode_cached() -> bool:
    """Whether a worker finds the bytecode of what it imports, or compiles it (most of a cold start then)."""
    import importlib.util

    import durable_mp.context

    return os.path.exists(importlib.util.cache_from_source(durable_mp.context.__file__))


def first_group(method: str) -> str:
    return f"{FIRST} [{method}]"


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def run(p: dict, runner: Runner) -> ScenarioResult:
    n = workers()
    items = p["items"]
    default = default_start_method()

    def many(method: str, count: int):
        def go() -> Sample:
            wall, out, _ = run_durable(map_handler, {"items": count}, NAME, max_workers=n, start_method=method)
            check(out == [2 * x for x in range(count)], f"durable_mp map results differ under {method}")
            return Sample(wall)
        return go

    variants = []
    for method in methods():
        def pool(m: str = method) -> Sample:
            return ppe_first_task(m, n)

        def durable(m: str = method) -> Sample:
            return first_branch(m, 0, n)
        group = first_group(method)
        variants.append(Variant(PPE, pool, pool, baseline=True, group=group,
                                note=f"ProcessPoolExecutor ({method}): create, first task"))
        variants.append(Variant(DURABLE, durable, durable, group=group, note="default" if method == default else None))
    variants.append(Variant(PPE, lambda: ppe_first_task("fork", n), lambda: ppe_first_task("fork", n),
                            baseline=True, group=FIRST_STEPS, note="ProcessPoolExecutor (fork): create, first task"))
    for method in methods():
        def go(m: str = method) -> Sample:
            return first_branch(m, DRIVER_STEPS, n)
        variants.append(Variant(method, go, go, group=FIRST_STEPS, note="default" if method == default else None))
    for method in methods():
        variants.append(Variant(method, many(method, items), many(method, 100), work=items, unit="items",
                                baseline=method == default, group=MANY, note="default" if method == default else None))
    rows = runner.measure(NAME, variants)
    res = ScenarioResult(NAME, TITLE, {**p, "workers": n, "driver_steps": DRIVER_STEPS}, rows)
    for method in methods():
        first, after_steps = res.row(DURABLE, first_group(method)), res.row(method, FIRST_STEPS)
        bulk = res.row(method, MANY)
        if first is None or first.median is None:
            continue
        whole = first.info_median("whole_s")
        res.facts[f"{method}: first branch starts after (ms)"] = ms(first.median)
        if after_steps is not None:
            res.facts[f"{method}: ... with {DRIVER_STEPS} driver steps first (ms)"] = ms(after_steps.median)
        res.facts[f"{method}: whole 1-item job (ms)"] = ms(whole)
        base = res.row(PPE, first_group(method))
        res.facts[f"{method}: ppe first task starts after (ms)"] = ms(base.median if base else None)
        if bulk is not None and bulk.median is not None and whole is not None:
            per_item = max(0.0, bulk.median - whole) / max(1, items - 1)
            res.facts[f"{method}: per-item overhead (us)"] = round(per_item * 1e6, 1)
    for group, variant, label in ((first_group(default), DURABLE, "map at once"),
                                  (FIRST_STEPS, default, f"{DRIVER_STEPS} driver steps first")):
        row = res.row(variant, group)
        res.targets.append(Target(f"start: {default} (default) run() -> first branch, {label} (ms)",
                                  ms(row.median if row else None), TARGET_SECONDS * 1e3, "<=", "ms"))
        res.targets.append(Target(f"start: {default} first branch / ppe first task, {label}",
                                  res.compare(variant, PPE, group), 1.0, "<=", "x", own=True))
    if not bytecode_cached():
        res.notes.append("durable_mp has no cached bytecode (PYTHONDONTWRITEBYTECODE?): every spawned worker and "
                         "fork server compiles its modules from source; `python -m compileall` on the package "
                         "removes that (a pip install does it)")
    for method in methods():
        if method != "fork":
            res.targets.append(Target(f"start: {method} first branch / ppe ({method}) first task",
                                      res.compare(DURABLE, PPE, first_group(method)), TARGET_VS_PPE, "<=", "x"))
    return res
