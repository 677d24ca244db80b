"""``seed``: the blog post's handler, three API calls (2 s, 3 s, 2 s) in parallel branches.

The calls only sleep, so the ideal speedup over calling them one after the other is
``sum / max`` (7 / 3 = 2.33).  On a 2-core machine this also exercises the pool growing
past the core count while its workers sit idle on the CPU (docs/architecture.md "Scheduling").
"""

from __future__ import annotations

import time

from durable_mp import durable_execution
from durable_mp.bench.core import Runner, ScenarioResult, Sample, Target, Variant, check, run_durable, timed

NAME = "seed"
TITLE = "the blog post's three API calls (sleeps) in parallel branches"

DELAYS = (("fetch_user", 2.0), ("fetch_orders", 3.0), ("fetch_inventory", 2.0))
RESPONSES = {
    "fetch_user": {"user_id": "U001", "name": "Taro Yamada", "email": "taro@example.com"},
    "fetch_orders": {"order_id": "O001", "items": ["item1", "item2"], "total": 5000},
    "fetch_inventory": {"product_id": "P001", "stock": 100, "warehouse": "Tokyo"},
}


def params(quick: bool) -> dict:
    return {"scale": 0.25 if quick else 1.0}


def call_api(name: str, seconds: float) -> dict:
    time.sleep(seconds)
    return dict(RESPONSES[name])


@durable_execution
def blog_handler(event: dict, context) -> dict:
    def branch(name: str, seconds: float):
        def fetch(ctx):
            return ctx.step(lambda _: call_api(name, seconds), name=name)
        return fetch

    result = context.parallel([branch(name, seconds) for name, seconds in event["calls"]])
    return {
        "user": result.all[0].result,
        "orders": result.all[1].result,
        "inventory": result.all[2].result,
        "success_count": result.success_count,
    }


def _expected() -> dict:
    return {"user": RESPONSES["fetch_user"], "orders": RESPONSES["fetch_orders"],
            "inventory": RESPONSES["fetch_inventory"], "success_count": 3}


def run(p: dict, runner: Runner) -> ScenarioResult:
    calls = [(name, seconds * p["scale"]) for name, seconds in DELAYS]
    total = sum(s for _, s in calls)
    longest = max(s for _, s in calls)

    def sequential() -> Sample:
        wall, out = timed(lambda: {"user": call_api(*calls[0]), "orders": call_api(*calls[1]),
                                   "inventory": call_api(*calls[2]), "success_count": 3})
        check(out == _expected(), f"sequential calls returned {out!r}")
        return Sample(wall)

    def durable() -> Sample:
        wall, out, _ = run_durable(blog_handler, {"calls": calls}, "seed")
        check(out == _expected(), f"durable_mp blog handler returned {out!r}")
        return Sample(wall)

    rows = runner.measure(NAME, [
        Variant("sequential", sequential, work=len(calls), unit="calls", baseline=True),
        Variant("durable_mp.parallel", durable, work=len(calls), unit="calls"),
    ])
    res = ScenarioResult(NAME, TITLE, {**p, "calls": calls}, rows)
    ideal = total / longest
    speedup = None
    dmp = res.row("durable_mp.parallel")
    if dmp.median:
        speedup = res.baseline().median / dmp.median
    res.facts = {"ideal speedup (sum/max)": round(ideal, 3),
                 "speedup": None if speedup is None else round(speedup, 3),
                 "share of ideal": None if speedup is None else round(speedup / ideal, 3),
                 "durable_mp overhead over the longest call (s)": None if not dmp.median
                 else round(dmp.median - longest, 3)}
    res.targets.append(Target("seed: durable_mp speedup / ideal (sum/max)",
                              None if speedup is None else speedup / ideal, 0.95, ">=", own=True))
    return res
