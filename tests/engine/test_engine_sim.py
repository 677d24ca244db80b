"""The deterministic simulation of the engine (``engine_sim``): seeded schedules, invariants after every step.

``DURABLE_MP_SIM_SEED=<n>`` runs only schedule ``n`` in every test here (replaying a failure);
``DURABLE_MP_SIM_SCHEDULES=<n>`` runs ``n`` schedules in ``test_schedules`` (10,000 by default),
``DURABLE_MP_SIM_FIRST=<n>`` starts every test's seeds at ``n`` instead of 0 (fresh schedules).
A failure names its seed and the command that replays it.

Found on main before the fixes of issue 18 (branch ``engine``), which pass 6,000 schedules:
* defect 1, profile ``deaths``: 127 of seeds 0-999, first 1, 4, 22, 38 (``NO_CHECKPOINTS``; with
  that check ignored, step ``a`` ran its at-most-once body again, e.g. seed 1);
* defect 2, profile ``nested``: 509 of seeds 0-599, first 0, 1, 4, 5 (``OUT_OF_ORDER``; with that
  check ignored, a parallel branch SUCCEEDED -> STARTED, e.g. seed 24, and left STARTED under
  its SUCCEEDED parallel).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
from engine_sim import BACKWARDS, NO_CHECKPOINTS, PROFILES, RAN_TWICE, Sim, Violation, run_schedules

from durable_mp.core.records import OpRecord, OpStatus
from durable_mp.engine.batch_run import BatchRun
from durable_mp.engine.dispatcher import Dispatcher
from durable_mp.engine.worker import Outbox

SCHEDULES = int(os.environ.get("DURABLE_MP_SIM_SCHEDULES", "10000"))
ONE_SEED = os.environ.get("DURABLE_MP_SIM_SEED")
FIRST_SEED = int(os.environ.get("DURABLE_MP_SIM_FIRST", "0"))  # fresh schedules: start elsewhere than 0


def seeds(count: int, start: int = 0) -> range:
    """The seeds a test runs: ``count`` from ``start`` (shifted by ``DURABLE_MP_SIM_FIRST``), or
    the one ``DURABLE_MP_SIM_SEED`` names."""
    if ONE_SEED is not None:
        return range(int(ONE_SEED), int(ONE_SEED) + 1)
    return range(FIRST_SEED + start, FIRST_SEED + start + count)


def check(found: list[Violation]) -> None:
    if found:
        raise found[0]


@pytest.mark.timeout(600)
def test_schedules() -> None:
    """Every profile in turn (seed % 4): deaths, commit failures, driver crashes, nested parallels."""
    for profile in PROFILES:
        check(run_schedules((s for s in seeds(SCHEDULES) if PROFILES[s % len(PROFILES)] == profile), profile))


@pytest.mark.timeout(300)
def test_a_worker_death_redispatches_finished_neighbours_with_their_checkpoints() -> None:
    """Defect 1: an item finished but still in the dead worker's outbox went back without its checkpoints."""
    check(run_schedules(seeds(1000), "deaths"))


@pytest.mark.timeout(300)
def test_nested_parallel_records_reach_the_driver_in_order() -> None:
    """Defect 2: ``Outbox.sync`` took records under the send lock and sent them after, so newer records
    of another thread could overtake them (a nested branch recorded STARTED over its SUCCEEDED)."""
    check(run_schedules(seeds(600), "nested"))


@pytest.mark.timeout(300)
def test_fault_free_schedules_give_the_expected_result() -> None:
    """Top-level items only, no faults: every interleaving ends with the closed-form result (passes on main)."""
    check(run_schedules(seeds(500), "clean"))


class ReordersRecords(Outbox):
    """A deliberately broken outbox: each STARTED record is held back and sent after the next record."""

    held: OpRecord | None = None

    def add(self, rec: OpRecord) -> None:
        if rec.status == OpStatus.STARTED and self.held is None:
            self.held = rec
            return
        super().add(rec)
        if self.held is not None:
            held, self.held = self.held, None
            super().add(held)


@pytest.mark.timeout(120)
def test_a_broken_outbox_is_caught_with_its_seed() -> None:
    """The checker is not vacuous: an outbox that reorders records fails, naming the seed and the replay."""
    found = run_schedules(range(20), "clean", outbox_class=ReordersRecords)
    assert found, "a reordering outbox went unnoticed for 20 schedules"
    violation = found[0]
    assert violation.invariant == "a record's status moved backwards"
    assert f"seed {violation.seed} (clean)" in str(violation)
    assert f"tests/engine/engine_sim.py {violation.seed} clean" in str(violation)


class ForgetsCheckpoints(Dispatcher):
    """A deliberately broken dispatcher: it re-dispatches every branch without its checkpoints."""

    def _prepare_chunk(self, batch: BatchRun, indices: list[int]) -> Any:
        batch.needs_ckpt.clear()
        return super()._prepare_chunk(batch, indices)


@pytest.mark.timeout(120)
def test_a_dispatcher_that_forgets_checkpoints_is_caught() -> None:
    """Worker deaths send branches back; without their checkpoints the checker stops the schedule."""
    found = run_schedules(range(200), "deaths", dispatcher_class=ForgetsCheckpoints)
    assert found, "a dispatcher that drops checkpoints went unnoticed for 200 schedules"
    assert found[0].invariant == NO_CHECKPOINTS, str(found[0])
    ran_twice = run_schedules(range(400), "deaths", dispatcher_class=ForgetsCheckpoints, ignore=[NO_CHECKPOINTS])
    assert ran_twice and ran_twice[0].invariant in (RAN_TWICE, BACKWARDS), str(ran_twice[:1])


@pytest.mark.timeout(120)
def test_a_schedule_replays_exactly() -> None:
    """The same seed gives the same schedule: the same trace and the same violation (or outcome)."""
    for seed in seeds(30):
        runs = []
        for _ in range(2):
            sim = Sim(seed, "mixed", outbox_class=ReordersRecords if seed % 2 else Outbox)
            try:
                result: object = sim.run()
            except Violation as violation:
                result = str(violation)
            runs.append((result, sim.trace, sim.steps, sim.clock.now))
        assert runs[0] == runs[1], f"seed {seed} did not replay"


@pytest.mark.timeout(300)
def test_the_schedules_inject_every_fault() -> None:
    """Across a few hundred schedules, workers die, commits fail, stores turn unwritable, drivers crash and restart."""
    seen: Counter[str] = Counter()
    for seed in range(400):
        sim = Sim(seed, "mixed")
        try:
            sim.run()
        except Violation:
            pass
        seen.update(event.split(" ")[0] + " " + event.split(" ")[1] for event in sim.trace)
        seen["commit errors"] += sim.commit_errors
    for event in ("kill worker", "driver crash", "store unwritable", "driver restart"):
        assert seen[event] > 0, f"no {event!r} in 400 schedules: {dict(seen)}"
    assert seen["commit errors"] > 0, dict(seen)
