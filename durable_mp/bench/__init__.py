"""``python -m durable_mp.bench``: durable_mp side by side with plain process pools.

Each scenario is one module with ``NAME``, ``TITLE``, ``params(quick) -> dict`` and
``run(params, runner) -> ScenarioResult``; ``SCENARIOS`` lists them in the order they run.
``run_scenario`` runs one and turns an exception into the result's ``error`` (a slow
result is never an error; a wrong one is).  See ``bench/README.md``.

The names below are imported on first use (PEP 562): a worker that unpickles a bench
item imports this package, and must not pay for every scenario (``bench.scenarios``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from durable_mp.bench.core import BenchError, Progress, Runner, ScenarioResult, Target
    from durable_mp.bench.scenarios import SCENARIOS, run_scenario

DEFAULT_REPEATS = 5
QUICK_REPEATS = 3

_HOME_OF = {"SCENARIOS": "durable_mp.bench.scenarios", "run_scenario": "durable_mp.bench.scenarios",
            **{name: "durable_mp.bench.core" for name in ("BenchError", "Progress", "Runner", "ScenarioResult",
                                                           "Target")}}


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'durable_mp.bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["SCENARIOS", "DEFAULT_REPEATS", "QUICK_REPEATS", "BenchError", "Progress", "Runner", "ScenarioResult",
           "Target", "run_scenario"]
