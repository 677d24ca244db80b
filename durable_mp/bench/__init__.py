"""``python -m durable_mp.bench``: durable_mp side by side with plain process pools.

Each scenario is one module with ``NAME``, ``TITLE``, ``params(quick) -> dict`` and
``run(params, runner) -> ScenarioResult``; ``SCENARIOS`` lists them in the order they run.
``run_scenario`` runs one and turns an exception into the result's ``error`` (a slow
result is never an error; a wrong one is).  See ``bench/README.md``.
"""

from __future__ import annotations

import time
import traceback
from types import ModuleType

from durable_mp.bench import cpu, growth, memory, overhead, payload, recovery, replay, seed, start_methods
from durable_mp.bench.core import BenchError, Progress, Runner, ScenarioResult, Target

SCENARIOS: dict[str, ModuleType] = {m.NAME: m for m in (seed, cpu, overhead, payload, recovery, memory,
                                                        start_methods, growth, replay)}

DEFAULT_REPEATS = 5
QUICK_REPEATS = 3


def run_scenario(name: str, runner: Runner, *, quick: bool = False, params: dict | None = None) -> ScenarioResult:
    """Run scenario ``name`` with its (quick) parameters, updated by ``params``."""
    module = SCENARIOS[name]
    p = module.params(quick)
    p.update(params or {})
    t0 = time.monotonic()
    try:
        res = module.run(p, runner)
    except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others' numbers
        res = ScenarioResult(name, module.TITLE, p)
        res.error = "".join(traceback.format_exception(exc))
    res.seconds = time.monotonic() - t0
    return res


__all__ = ["SCENARIOS", "DEFAULT_REPEATS", "QUICK_REPEATS", "BenchError", "Progress", "Runner", "ScenarioResult",
           "Target", "run_scenario"]
