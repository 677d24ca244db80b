"""Crash differential: a generated handler killed at a random step ends as if never killed.

Each seed gives one handler (``diffgen``, the generator of the reference differential
test, which pins the uninterrupted runs to the reference SDK).  Here each runs three times
in driver subprocesses (``crash_diff_job.py``): once undisturbed, then in a fresh store
with one SIGKILL at a step's start or end drawn from the seed (to the driver, or to the worker running
the step), followed, when the driver died, by a second driver on the same execution.
Asserted: the killed-and-resumed run reports the same status, result (every
``BatchResult`` it saw: counts, reasons, items) or error, and stores the same operation
records (ids, types, names, statuses, attempts, payloads, errors, batch summaries) as the
undisturbed one, and the store passes ``durable_mp.store.audit``.  A third driver on the
execution that SUCCEEDED returns the same result without running a step (a FAILED one is
resumed by design, its failed steps running again as new attempts: nothing to compare).

Handlers with a racing batch (``diffgen`` marks them) are left out: which of their items
end first is timing, not replay.  ``DURABLE_MP_CRASHDIFF_HANDLERS=<n>`` runs n seeds,
``DURABLE_MP_CRASHDIFF_SEED=<n>`` one; a seed fixes the handler and the killed tick.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import diffgen
from durable_mp.store.audit import audit
from durable_mp.store.facade import Store
from util import REPO, TESTS

JOB = Path(__file__).with_name("crash_diff_job.py")
DEFAULT_HANDLERS = 16
RUN_SECONDS = 90


def seeds() -> list[int]:
    chosen = os.environ.get("DURABLE_MP_CRASHDIFF_SEED")
    if chosen:
        return [int(chosen)]
    wanted = int(os.environ.get("DURABLE_MP_CRASHDIFF_HANDLERS", DEFAULT_HANDLERS))
    found, seed = [], 1000
    while len(found) < wanted:
        if not diffgen.generate(seed).racing:
            found.append(seed)
        seed += 1
    return found


def drive(seed: int, store: Path, ticks: Path, kill_at: int, mode: str, out: Path) -> int:
    """One driver subprocess; its exit code (negative: the signal that ended it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(TESTS),
                                                                      os.environ.get("PYTHONPATH")]))}
    ticks.mkdir(exist_ok=True)
    args = [sys.executable, str(JOB), str(seed), str(store), f"crash-diff-{seed}", str(ticks), str(kill_at), mode,
            str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=RUN_SECONDS, env=env, cwd=str(out.parent))
    if proc.returncode not in (0, -9):
        raise AssertionError(f"seed {seed}: driver exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.returncode


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["driver", "worker"])
def test_a_handler_killed_at_any_step_resumes_to_the_undisturbed_outcome(tmp_path, mode):
    failures = []
    for seed in seeds():
        work = tmp_path / f"{mode}-{seed}"
        work.mkdir()
        drive(seed, work / "calm-store", work / "calm-ticks", -1, mode, work / "calm.json")
        calm, steps = read(work / "calm.json"), len(os.listdir(work / "calm-ticks"))
        if steps == 0:
            continue
        kill_at = random.Random(f"{seed}-{mode}").randrange(steps)
        store, ticks, out = work / "store", work / "ticks", work / "out.json"
        runs = 0
        while not out.exists():
            runs += 1
            assert runs <= 2, f"seed {seed}: the driver died again after its one planned kill"
            drive(seed, store, ticks, kill_at, mode, out)
        resumed = read(out)
        if mode == "worker":
            assert runs == 1, f"seed {seed}: a worker's death ended its driver"
        problems = [f"{key}: undisturbed {calm.get(key)!r} != killed at step {kill_at} {resumed.get(key)!r}"
                    for key in ("status", "result", "error", "execution_status") if calm.get(key) != resumed.get(key)]
        if calm["operations"] != resumed["operations"]:
            only_calm = [op for op in calm["operations"] if op not in resumed["operations"]]
            only_killed = [op for op in resumed["operations"] if op not in calm["operations"]]
            problems.append(f"operations: only undisturbed {only_calm[:3]}, only killed {only_killed[:3]}")
        opened = Store(str(store))
        try:
            problems.extend(f"audit: {violation}" for violation in audit(opened, f"crash-diff-{seed}"))
        finally:
            opened.close()
        if resumed["status"] == "SUCCEEDED":
            before = len(os.listdir(ticks))
            drive(seed, store, ticks, -1, mode, work / "again.json")
            again = read(work / "again.json")
            if len(os.listdir(ticks)) != before:
                problems.append(f"a re-run of the finished execution ran {len(os.listdir(ticks)) - before} steps")
            if again.get("result") != resumed["result"]:
                problems.append(f"a re-run of the finished execution returned {again.get('result')!r}")
        if problems:
            failures.append(f"seed {seed} (DURABLE_MP_CRASHDIFF_SEED={seed}, {mode} killed at step {kill_at} of "
                            f"{steps}, {runs} driver runs):\n  " + "\n  ".join(problems))
    assert not failures, "\n\n".join(failures)
