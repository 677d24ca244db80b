"""The scenarios in the order they run, and ``run_scenario``, which runs one of them.

Apart from the package's ``__init__`` so that a worker unpickling a bench item
(``durable_mp.bench.items``, ``markers``) does not import every scenario and, with them,
the whole driver side of durable_mp.
"""

from __future__ import annotations

import time
import traceback
from types import ModuleType

from durable_mp.bench import cpu, growth, inputs, memory, overhead, payload, recovery, replay, seed, start_methods
from durable_mp.bench.core import Runner, ScenarioResult

SCENARIOS: dict[str, ModuleType] = {m.NAME: m for m in (seed, cpu, overhead, payload, inputs, recovery, memory,
                                                        start_methods, growth, replay)}


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
