"""Chaos: seeded random faults at random points of a job that mixes everything.

A round is one seed.  The seed draws the job's shape (``chaos_job.py``: steps, a map
whose items run a nested parallel and a child context, a parallel of nested maps, a
retried flaky step, results over 64 KiB) and a fault plan, then drivers run the job,
each in its own session, until it finishes.  Faults come from two sides:

* inside the job, at planned sites, each firing once ever (marker files): a worker
  SIGKILLs, SIGTERMs or ``os._exit``\\ s itself, a worker SIGKILLs the driver, the
  handler's own code (in the driver) SIGKILLs, SIGTERMs or ``os._exit``\\ s the driver;
* outside, a watcher thread at random times: SIGKILL or SIGTERM to a random worker or
  to the driver, or the driver's store writes fail (its ``RLIMIT_FSIZE`` pinned to the
  store file's size, for a moment or for good).

A driver that died is run again.  Each round asserts that
(a) the result equals the fault-free result (computed directly from the job's values);
(b) nothing that was committed ran again: after each driver death the store is read
    (its driver is gone, so that is exactly what was committed) and every step, branch
    and child context SUCCEEDED there has no more log lines at the end than then;
(c) no process is left: the driver's session empties after each run, and no worker pid
    seen during the round is alive at its end;
(d) the store holds the engine's invariants (``durable_mp.store.audit``: every parent
    recorded, every id derived, nothing unfinished under a finished parent but what the
    design allows, every terminal record with its outcome), checked after every driver
    death and at the end of the round;
and that every planned in-job fault fired, the store holds every operation SUCCEEDED.

Failures name the seed.  ``DURABLE_MP_CHAOS_SECONDS`` sets the time budget of all cases
together (default 60 s: rounds start until a case's share of it is used).
``DURABLE_MP_CHAOS_SEED=N`` runs only that seed (choose the case with ``-k``): once when
no budget is given, else again and again while the case's share of the budget lasts (at
least once).  A seed fixes the plan, not the timing, so repeating it is how a
timing-dependent failure is hunted down.

Known engine bugs (``KNOWN_BUGS``) are recognised by their signature; a round that hits
one is reported and the case ends as xfail, while any other failure fails the test.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import psutil
import pytest

import chaos_job
import durable_mp
from durable_mp.exceptions import StoreError
from durable_mp.store import Store
from durable_mp.store.audit import audit
from procs import session_processes

JOB = pathlib.Path(chaos_job.__file__)
# The drivers import the durable_mp this test imported, not whatever the path finds first.
SOURCE_ROOT = str(pathlib.Path(durable_mp.__file__).resolve().parent.parent)
SEED = os.environ.get("DURABLE_MP_CHAOS_SEED")
# a seeded run without a budget replays its seed once; with one, it repeats the seed while the budget lasts
TOTAL_SECONDS = float(os.environ.get("DURABLE_MP_CHAOS_SECONDS", "0" if SEED is not None else "60"))
RUN_TIMEOUT = 120.0  # seconds one driver run may take before it counts as hung
SETTLE_SECONDS = 15.0  # seconds a dead driver's workers get to notice and exit
WATCH_INTERVAL = 0.01  # seconds between looks at the driver's children
COMMIT_FAULT_SECONDS = 0.5  # how long a transient store-write failure lasts
MAX_CRASH_RETRIES = 10  # more crashes than a plan can cause in one branch
INTERRUPTED = {-signal.SIGKILL, -signal.SIGTERM, 128 + signal.SIGTERM, chaos_job.FAULT_EXIT_CODE}

pytestmark = pytest.mark.timeout(int(TOTAL_SECONDS) + 4 * int(RUN_TIMEOUT))


@dataclass(frozen=True)
class Case:
    """Which faults a case draws from, and its share of the time budget."""

    share: float
    worker: tuple[str, ...]  # faults at sites that run in a worker
    driver: tuple[str, ...]  # faults at sites in the handler's code (the driver)
    outside: tuple[str, ...]  # faults the watcher thread injects
    must_fire: tuple[str, ...] = ()  # one of these outside faults is in every plan


CRASHES = Case(0.5, ("sigkill", "os_exit", "kill_driver"), ("sigkill", "os_exit"),
               ("worker_sigkill", "driver_sigkill"))
SIGNALS = Case(0.25, chaos_job.WORKER_FAULTS, chaos_job.DRIVER_FAULTS,
               ("worker_sigkill", "worker_sigterm", "driver_sigkill", "driver_sigterm"))
COMMITS = Case(0.25, CRASHES.worker, CRASHES.driver, CRASHES.outside + ("commit_fails", "store_unwritable"),
               must_fire=("commit_fails", "store_unwritable"))
# A failed commit may be retried or stop the run as interrupted: the design allows either.
STORE_FAULTS = {"commit_fails", "store_unwritable"}
DRIVER_OUTSIDE = {"driver_sigkill", "driver_sigterm"} | STORE_FAULTS


# Engine bugs this test finds on today's main, each recognised by its signature, so that
# any other failure still fails: a round that hits one makes the case xfail (not strict).
# Delete an entry once its fix is in.  Found and since fixed: a committed step in a nested
# branch without a record ran again after a crash (pinned below); issue #8 defects 2 and 5; a worker
# that died idle made Pool.close drain it twice (pinned below).
KNOWN_BUGS: dict[str, str] = {}


class KnownBug(Exception):
    """A round failed with the signature of a known engine bug (a key of KNOWN_BUGS)."""

    def __init__(self, bug: str, message: str) -> None:
        super().__init__(message)
        self.bug = bug


def draw_plan(seed: int, case: Case) -> dict:
    """The job's shape and its faults, all from the seed."""
    rng = random.Random(seed)
    shape = {"items": rng.randint(3, 6), "width": rng.randint(2, 3), "tops": rng.randint(2, 3),
             "inner": rng.randint(2, 5), "step_seconds": round(rng.uniform(0.005, 0.03), 3)}
    sites = chaos_job.fault_sites(shape)
    faults = {}
    for name in rng.sample(sorted(sites), rng.randint(2, 5)):
        allowed = case.driver if chaos_job.in_driver(name) else case.worker
        kinds = [kind for kind in sites[name] if kind in allowed]
        if kinds:
            faults[name] = rng.choice(kinds)
    outside = [rng.choice(case.must_fire)] if case.must_fire else []
    outside += [rng.choice(case.outside) for _ in range(rng.randint(0, 2))]
    # seconds after a run's first worker appears; a fault-free run lasts about one second,
    # and the store file stops growing (what a store fault needs to bite) well before its end
    timed = sorted([round(rng.uniform(0.0, 0.4 if kind in STORE_FAULTS else 1.0), 3), kind] for kind in outside)
    return {"seed": seed, "shape": shape, "faults": faults, "outside": timed,
            "max_crash_retries": MAX_CRASH_RETRIES, "ignore_sigxfsz": bool(case.must_fire)}


def driver_env() -> dict[str, str]:
    """The environment of a driver subprocess: it imports this test's durable_mp."""
    path = os.pathsep.join(filter(None, [SOURCE_ROOT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def live_children(pid: int) -> list[psutil.Process]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for kid in kids:
        try:
            if kid.status() != psutil.STATUS_ZOMBIE:
                out.append(kid)
        except psutil.Error:
            pass
    return out




def alive(pid: int, create_time: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == create_time and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Round:
    """One seed's runs, and everything seen along the way for the assertions."""

    seed: int
    case: str
    plan: dict
    workdir: pathlib.Path
    events: list = field(default_factory=list)  # what happened, for the failure message
    workers: set = field(default_factory=set)  # (pid, create time) of every driver child seen
    committed_at: dict = field(default_factory=dict)  # identity -> its log lines when first seen committed
    lineage: dict = field(default_factory=dict)  # identity -> its ancestors' records then, for the message
    runs: int = 0

    @property
    def store(self) -> str:
        return str(self.workdir / "store")

    def stderr(self) -> str:
        """The last driver run's stderr."""
        return (self.workdir / f"run-{self.runs - 1}.err").read_text() if self.runs else ""

    def message(self, what: str) -> str:
        return (f"chaos seed {self.seed} ({self.case}): {what}\n"
                f"re-run: DURABLE_MP_CHAOS_SEED={self.seed} python -m pytest tests/engine/test_chaos.py -k {self.case}\n"
                f"plan: {json.dumps(self.plan)}\nevents: {self.events}\n"
                f"last driver stderr:\n{self.stderr()[-3000:]}")

    def fail(self, what: str) -> None:
        pytest.fail(self.message(what), pytrace=False)

    def check(self, ok: bool, what: str, known: str | None = None) -> None:
        """Fail with ``what`` unless ``ok``; as the known bug ``known`` when it is given."""
        if not ok:
            if known is not None:
                raise KnownBug(known, self.message(what))
            self.fail(what)

    def log_counts(self) -> dict[str, int]:
        logs = self.workdir / "log"
        return {name: len((logs / name).read_text().splitlines()) for name in os.listdir(logs)}

    def fired(self) -> set[str]:
        return set(os.listdir(self.workdir / "fired"))

    def records(self) -> list:
        if not os.path.exists(self.store):
            return []
        with Store(self.store, readonly=True) as st:
            return st.ops(chaos_job.EXECUTION_ID)

    def check_invariants(self, when: str) -> None:
        """(d): the store's records hold the engine's invariants (read with no driver running)."""
        if not os.path.exists(self.store):
            return
        with Store(self.store, readonly=True) as st:
            problems = audit(st, chaos_job.EXECUTION_ID)
        self.check(not problems, f"invariants broken in the store {when}:\n" + "\n".join(map(str, problems)))

    def execution_status(self) -> str | None:
        if not os.path.exists(self.store):
            return None
        with Store(self.store, readonly=True) as st:
            rec = st.get_execution(chaos_job.EXECUTION_ID)
        return rec.status if rec else None


class Watcher(threading.Thread):
    """Watches one driver run: records its workers, fires the outside faults when due."""

    def __init__(self, rnd: Round, proc: subprocess.Popen, pending: list, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.rnd, self.proc, self.pending, self.rng = rnd, proc, pending, rng
        self.fired: list[str] = []
        self.restore_at: float | None = None

    def run(self) -> None:
        started = None
        while self.proc.poll() is None:
            kids = live_children(self.proc.pid)
            for kid in kids:
                try:
                    self.rnd.workers.add((kid.pid, kid.create_time()))
                except psutil.Error:
                    pass
            now = time.monotonic()
            if started is None and kids:
                started = now
            while started is not None and self.pending and now - started >= self.pending[0][0]:
                self.fire(self.pending.pop(0)[1], sorted(kid.pid for kid in kids))
            if self.restore_at is not None and now >= self.restore_at:
                self.set_fsize(psutil.RLIM_INFINITY)
                self.restore_at = None
                self.rnd.events.append("store writable again")
            time.sleep(WATCH_INTERVAL)

    def set_fsize(self, limit: int) -> None:
        try:
            proc = psutil.Process(self.proc.pid)
            proc.rlimit(psutil.RLIMIT_FSIZE, (limit, proc.rlimit(psutil.RLIMIT_FSIZE)[1]))
        except psutil.Error:
            pass

    def fire(self, kind: str, workers: list[int]) -> None:
        try:
            if kind.startswith("worker_"):
                if not workers:
                    self.rnd.events.append(f"{kind}: no worker to hit")
                    return
                pid = self.rng.choice(workers)
                os.kill(pid, signal.SIGKILL if kind == "worker_sigkill" else signal.SIGTERM)
                self.rnd.events.append(f"{kind} pid {pid}")
            elif kind in ("driver_sigkill", "driver_sigterm"):
                os.kill(self.proc.pid, signal.SIGKILL if kind == "driver_sigkill" else signal.SIGTERM)
                self.rnd.events.append(kind)
            else:  # commit_fails, store_unwritable: no store write may grow the file
                size = os.path.getsize(os.path.join(self.rnd.store, "data.mdb"))
                self.set_fsize(size)
                if kind == "commit_fails":
                    self.restore_at = time.monotonic() + COMMIT_FAULT_SECONDS
                self.rnd.events.append(f"{kind} at {size} bytes")
        except (OSError, psutil.Error) as exc:
            self.rnd.events.append(f"{kind}: {exc}")
            return
        self.fired.append(kind)


def run_driver(rnd: Round, pending: list, rng: random.Random) -> int:
    """One driver run to its end; its session must then empty.  Returns its exit code."""
    n = rnd.runs
    rnd.runs += 1
    with open(rnd.workdir / f"run-{n}.out", "w") as out, open(rnd.workdir / f"run-{n}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(JOB), rnd.store, str(rnd.workdir)], stdout=out, stderr=err,
                                start_new_session=True, env=driver_env())
    watcher = Watcher(rnd, proc, pending, rng)
    watcher.start()
    fired_before = rnd.fired()
    try:
        code = proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rnd.fail(f"driver run {n} hung for {RUN_TIMEOUT:.0f} s")
    watcher.join()
    new = sorted(rnd.fired() - fired_before)
    rnd.events.append(f"run {n}: exit {code}, in-job faults {new}, outside {watcher.fired}")
    deadline = time.monotonic() + SETTLE_SECONDS
    while (left := session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    rnd.check(not left, f"processes of driver run {n} left behind: {left}")
    if code != 0:
        check_stop(rnd, n, code, new, watcher.fired)
    return code


def check_stop(rnd: Round, n: int, code: int, new: list[str], outside: list[str]) -> None:
    """A driver run that ended non-zero must have been stopped by a fault aimed at it, and
    left the execution resumable."""
    rnd.check("DRAINING -> DRAINING" not in rnd.stderr(), f"driver run {n} failed closing its pool",
              known="drain-twice")
    driver_faults = [s for s in new if chaos_job.in_driver(s) or rnd.plan["faults"][s] == "kill_driver"]
    driver_faults += [k for k in outside if k in DRIVER_OUTSIDE]
    rnd.check(bool(driver_faults), f"driver run {n} exited {code} but no fault was aimed at the driver")
    status = rnd.execution_status()
    if status == "SUCCEEDED" and DRIVER_OUTSIDE & set(outside):
        return  # an outside fault landed after the execution finished, as the driver exited
    store_fault = bool(STORE_FAULTS & set(outside))
    if not store_fault:  # a store fault may stop a run with any error
        rnd.check(code in INTERRUPTED, f"driver run {n} exited {code} for {driver_faults}")
    rnd.check(status in (None, "RUNNING"), f"driver run {n} died but left the execution {status}")


def snapshot_committed(rnd: Round) -> None:
    """After a driver died: remember how often each committed operation's body had run."""
    counts = rnd.log_counts()
    records = rnd.records()
    by_id = {rec.op_id: rec for rec in records}
    for rec in records:
        if rec.status == "SUCCEEDED" and rec.name in counts and rec.name not in rnd.committed_at:
            rnd.committed_at[rec.name] = counts[rec.name]
            rnd.lineage[rec.name] = f"run {rnd.runs - 1}: {lineage(rec, by_id)}"


def lineage(rec, by_id: dict) -> str:
    """``name STATUS < parent STATUS < ...`` as the store holds it."""
    out = [f"{rec.name} {rec.status}"]
    while rec.parent_id:
        parent = by_id.get(rec.parent_id)
        if parent is None:
            out.append(f"{rec.parent_id[:8]} (no record)")
            break
        out.append(f"{parent.name} {parent.status}")
        rec = parent
    return " < ".join(out)


def first_difference(got, want, path="result") -> str | None:
    if isinstance(want, np.ndarray) or isinstance(got, np.ndarray):
        same = (isinstance(got, np.ndarray) and isinstance(want, np.ndarray) and got.dtype == want.dtype
                and np.array_equal(got, want))
        return None if same else f"{path}: {got!r:.80} != {want!r:.80}"
    if isinstance(want, dict):
        if not isinstance(got, dict) or got.keys() != want.keys():
            return f"{path}: {got!r:.80} != {want!r:.80}"
        return next((d for k in want if (d := first_difference(got[k], want[k], f"{path}[{k!r}]"))), None)
    if isinstance(want, (list, tuple)):
        if type(got) is not type(want) or len(got) != len(want):
            return f"{path}: {got!r:.80} != {want!r:.80}"
        return next((d for i, (g, w) in enumerate(zip(got, want, strict=True))
                     if (d := first_difference(g, w, f"{path}[{i}]"))), None)
    return None if (type(got) is type(want) and got == want) else f"{path}: {got!r} != {want!r}"


def run_round(seed: int, case_name: str, case: Case, workdir: pathlib.Path) -> Round:
    plan = draw_plan(seed, case)
    for sub in ("log", "fired", "flaky"):
        (workdir / sub).mkdir(parents=True)
    (workdir / "plan.json").write_text(json.dumps(plan))
    rnd = Round(seed, case_name, plan, workdir)
    rng = random.Random(seed + 1)  # the watcher's choices: its own stream, so the plan stays put
    pending = [tuple(event) for event in plan["outside"]]
    max_runs = 2 + len(plan["faults"]) + len(pending)  # each fault stops at most one run
    while rnd.runs < max_runs:
        if run_driver(rnd, pending, rng) == 0:
            break
        snapshot_committed(rnd)
        rnd.check_invariants(f"after driver run {rnd.runs - 1} died")  # (d)
    else:
        rnd.fail(f"not finished after {max_runs} driver runs")

    result_file = workdir / "result.pkl"
    rnd.check(result_file.exists(), "the last driver exited 0 without a result")
    with open(result_file, "rb") as f:
        got = pickle.load(f)
    diff = first_difference(got, chaos_job.expected(plan["shape"]))
    rnd.check(diff is None, f"result differs from the fault-free result: {diff}")  # (a)

    counts = rnd.log_counts()
    again = {name: (n, counts[name]) for name, n in rnd.committed_at.items() if counts[name] != n}
    rnd.check(not again, f"committed before a driver died, yet ran again (log lines then, now): {again}; "
                         f"in the store then: {[rnd.lineage[name] for name in sorted(again)]}")  # (b)

    ghosts = sorted(pid for pid, created in rnd.workers if alive(pid, created))
    rnd.check(not ghosts, f"worker processes still alive after the round: {ghosts}")  # (c)

    unfired = sorted(set(plan["faults"]) - rnd.fired())
    rnd.check(not unfired, f"planned faults never fired: {unfired}")
    names = chaos_job.item_names(plan["shape"])
    rnd.check(all(counts.get(name, 0) >= 1 for name in names["steps"] + names["bodies"]), "a body never ran")
    records = {rec.name: rec.status for rec in rnd.records()}
    missing = sorted(set(names["steps"] + names["bodies"]) - set(records))
    rnd.check(not missing, f"operations missing from the store: {missing}")
    unfinished = {name: status for name, status in records.items() if status != "SUCCEEDED"}
    rnd.check(not unfinished, f"operations not SUCCEEDED in the store: {unfinished}")
    rnd.check(rnd.execution_status() == "SUCCEEDED", f"execution is {rnd.execution_status()}")
    rnd.check_invariants("at the end of the round")  # (d)
    return rnd


def chaos(case_name: str, case: Case, tmp_path: pathlib.Path) -> None:
    """Rounds until the case's share of the budget is used (one round with a given seed)."""
    budget = TOTAL_SECONDS * case.share
    seeds = random.Random()  # a new stream each session: CI keeps exploring
    started = time.monotonic()
    last = 0.0
    n = 0
    known: dict[str, list[int]] = {}  # known bug -> seeds that hit it
    while n == 0 or time.monotonic() - started + last <= budget:
        seed = int(SEED) if SEED is not None else seeds.randrange(2**32)
        t0 = time.monotonic()
        try:
            rnd = run_round(seed, case_name, case, tmp_path / f"round-{n}")
            outcome = f"{rnd.runs} driver runs, {len(rnd.fired())} in-job faults, events {rnd.events}"
        except KnownBug as bug:
            known.setdefault(bug.bug, []).append(seed)
            outcome = f"known bug {bug.bug}:\n{bug}"
        last = time.monotonic() - t0
        n += 1
        print(f"chaos {case_name} seed {seed} ({last:.1f} s): {outcome}")
    if known:
        pytest.xfail("; ".join(f"{KNOWN_BUGS[bug]} (seeds {seeds})" for bug, seeds in known.items()))


def test_chaos_crashes(tmp_path):
    chaos("crashes", CRASHES, tmp_path)


def test_chaos_signals(tmp_path):
    chaos("signals", SIGNALS, tmp_path)


def test_chaos_commits(tmp_path):
    chaos("commits", COMMITS, tmp_path)


NESTED_JOB = textwrap.dedent(
    """
    import os, sys, time
    from durable_mp import durable_execution

    WORKDIR = sys.argv[2]

    def fetch(step_ctx):
        with open(os.path.join(WORKDIR, "fetch"), "a") as f:
            f.write(f"{os.getpid()}\\n")
        return 21

    def branch(ctx):
        value = ctx.step(fetch, name="nested-fetch")
        while not os.path.exists(os.path.join(WORKDIR, "go")):
            time.sleep(0.01)  # the fault lands here, after the step was committed
        return value * 2

    def item(ctx, x, i, xs):
        return ctx.parallel([branch]).get_results()

    @durable_execution
    def handler(event, ctx):
        return ctx.map([0], item).get_results()

    if __name__ == "__main__":
        print(handler.run(None, execution_id="nested", store=sys.argv[1]), flush=True)
    """
)


def committed_step(store: str, name: str) -> bool:
    try:
        with Store(store, readonly=True) as st:
            return any(r.name == name and r.status == "SUCCEEDED" for r in st.ops("nested"))
    except StoreError:  # the driver has not created the store yet
        return False


def wait_dead(pid: int, seconds: float = SETTLE_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while alive_pid(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive_pid(pid)


def alive_pid(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.parametrize("victim", ["driver", "worker"])
def test_a_committed_step_in_a_nested_branch_never_runs_again(victim, tmp_path):
    """Found by the chaos test (the step ran again before engine v2): the nested branch
    holding the committed step had no record yet when its worker or driver died."""
    script = tmp_path / "nested.py"
    script.write_text(NESTED_JOB)
    store = str(tmp_path / "store")
    cmd = [sys.executable, str(script), store, str(tmp_path)]
    env = driver_env()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not committed_step(store, "nested-fetch") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert committed_step(store, "nested-fetch")
        worker = int((tmp_path / "fetch").read_text().split()[0])
        if victim == "worker":
            os.kill(worker, signal.SIGKILL)  # it waits for "go" in the branch: the map item is re-dispatched
            wait_dead(worker)
            (tmp_path / "go").touch()
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
        else:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
            deadline = time.monotonic() + SETTLE_SECONDS
            while session_processes(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            (tmp_path / "go").touch()
            rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
            assert rerun.returncode == 0, rerun.stderr
            out = rerun.stdout
    finally:
        (tmp_path / "go").touch()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert out.strip() == "[[42]]"
    assert len((tmp_path / "fetch").read_text().split()) == 1, "the committed step ran again"


IDLE_DEATH_JOB = textwrap.dedent(
    """
    import sys, time
    import psutil
    from durable_mp import durable_execution

    @durable_execution
    def handler(event, ctx):
        result = ctx.parallel([lambda c: 1, lambda c: 2]).get_results()
        workers = psutil.Process().children()  # idle now: the parallel is over
        for worker in workers:
            worker.kill()
        deadline = time.monotonic() + 10
        while any(w.status() != psutil.STATUS_ZOMBIE for w in workers) and time.monotonic() < deadline:
            time.sleep(0.01)
        return result

    if __name__ == "__main__":
        print(handler.run(None, execution_id="idle-death", store=sys.argv[1]), flush=True)
    """
)


def test_workers_that_died_idle_do_not_fail_the_end_of_the_run(tmp_path):
    """Found by the chaos test (a worker SIGTERMed just before the run ended)."""
    script = tmp_path / "idle_death.py"
    script.write_text(IDLE_DEATH_JOB)
    store = str(tmp_path / "store")
    run = subprocess.run([sys.executable, str(script), store], capture_output=True, text=True, timeout=60,
                         env=driver_env())
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[1, 2]"
    with Store(store, readonly=True) as st:
        assert st.get_execution("idle-death").status == "SUCCEEDED"
