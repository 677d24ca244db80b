"""``recovery``: what a SIGKILL costs.

(a) **Worker killed.**  A parallel of CPU-bound branches, each two steps (``prepare``,
    ``work``); on its first attempt branch 0 SIGKILLs its own worker halfway through
    ``work``, after writing ``time.time()`` to a marker.  The re-dispatched attempt writes
    its start time; the difference is the death-to-re-dispatch latency.  Marker files
    count which branches and which steps ran again (docs/architecture.md "Faults": only the unfinished
    operation of that one branch may).  For contrast, ``ProcessPoolExecutor`` gets the
    same tasks and loses every unfinished one to ``BrokenProcessPool``.
(b) **Driver killed.**  ``recovery_job`` runs in its own session; once a third of its
    branches are done its whole process group is SIGKILLed, then the same command is
    run again.  Re-executed branches are compared with the ones in flight at the kill.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import shutil
import sys
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool

from durable_mp import durable_execution
from durable_mp.bench import cpu, recovery_job
from durable_mp.bench.core import (BenchError, Runner, Sample, ScenarioResult, Target, Variant, check, fresh_store,
                                   ppe, stop_helpers, timed, workers)
from durable_mp.bench.markers import counts, mark, read_time, write_time

NAME = "recovery"
TITLE = "SIGKILL of a worker, SIGKILL of the driver"

KILL_WAIT_SECONDS = 60.0
POLL_SECONDS = 0.005


def params(quick: bool) -> dict:
    if quick:
        return {"branches": 6, "step_ms": 40, "driver_branches": 9, "driver_step_ms": 100}
    return {"branches": 12, "step_ms": 100, "driver_branches": 18, "driver_step_ms": 200}


@contextlib.contextmanager
def _quiet_engine():
    """The engine logs a warning per worker death; here the deaths are on purpose."""
    logger = logging.getLogger("durable_mp")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def crashing_branch_body(markers: str, index: int, iterations: int, crash: bool) -> int:
    """The plain-function version of a branch: prepare, then work (branch 0 dies once)."""
    mark(markers, f"start-{index}")
    mark(markers, f"prepare-{index}")
    return _work(markers, index, iterations, crash)


def _work(markers: str, index: int, iterations: int, crash: bool) -> int:
    mark(markers, f"work-{index}")
    if crash and index == 0 and read_time(markers, "killed") is None:
        cpu.burn(iterations // 2, index + 1)
        write_time(markers, "killed", time.time())
        os.kill(os.getpid(), signal.SIGKILL)
    return cpu.burn(iterations, index + 1)


@durable_execution
def crash_handler(event: dict, context) -> list[int]:
    markers, iterations, crash = event["markers"], event["iterations"], event["crash"]

    def branch(index: int):
        def run(ctx):
            mark(markers, f"start-{index}")
            if index == 0 and read_time(markers, "killed") is not None:
                write_time(markers, "redispatched", time.time())

            def prepare(_):
                mark(markers, f"prepare-{index}")
                return index
            ctx.step(prepare, name=f"prepare-{index}")
            return ctx.step(lambda _: _work(markers, index, iterations, crash), name=f"work-{index}")
        return run

    result = context.parallel([branch(i) for i in range(event["branches"])], name="crash")
    result.throw_if_error()
    return result.get_results()


def _worker_kill(p: dict, n: int, iterations: int) -> list[Variant]:
    branches = p["branches"]
    expected = [cpu.burn(iterations, i + 1) for i in range(branches)]

    def durable(crash: bool) -> Sample:
        markers = tempfile.mkdtemp(prefix="durable_mp-bench-markers-")
        try:
            event = {"markers": markers, "iterations": iterations, "crash": crash, "branches": branches}
            with fresh_store(NAME) as (path, execution_id), _quiet_engine():
                wall, out = timed(lambda: crash_handler.run(event, store=path, execution_id=execution_id,
                                                            max_workers=n, progress=False))
            check(out == expected, "durable_mp results differ after a worker crash")
            starts, prepares, works = counts(markers, "start"), counts(markers, "prepare"), counts(markers, "work")
            info = {"branches_rerun": sum(1 for c in starts.values() if c > 1),
                    "finished_steps_rerun": sum(c - 1 for c in prepares.values()),
                    "killed_steps_rerun": sum(c - 1 for c in works.values())}
            if crash:
                killed, again = read_time(markers, "killed"), read_time(markers, "redispatched")
                check(killed is not None and again is not None, "branch 0 did not die and come back")
                info["redispatch_ms"] = (again - killed) * 1000
            return Sample(wall, info)
        finally:
            shutil.rmtree(markers, ignore_errors=True)

    def pool() -> Sample:
        markers = tempfile.mkdtemp(prefix="durable_mp-bench-markers-")
        try:
            def go():
                lost = 0
                with ppe(n) as ex:
                    futures = [ex.submit(crashing_branch_body, markers, i, iterations, True) for i in range(branches)]
                    for f in futures:
                        try:
                            f.result()
                        except BrokenProcessPool:
                            lost += 1
                return lost
            wall, lost = timed(go)
            check(lost >= 1, "ProcessPoolExecutor survived a SIGKILLed worker?")
            return Sample(wall, {"tasks_lost": lost})
        finally:
            shutil.rmtree(markers, ignore_errors=True)

    work = dict(work=branches, unit="branches", group="worker SIGKILL")
    return [
        Variant("durable_mp, no fault", lambda: durable(False), **work, baseline=True),
        Variant("durable_mp, 1 worker killed", lambda: durable(True), **work),
        Variant("ppe, 1 worker killed", pool, **work, note="BrokenProcessPool: unfinished tasks lost"),
    ]


def _job(store: str, markers: str, execution_id: str, p: dict, n: int) -> list[str]:
    return [sys.executable, "-m", "durable_mp.bench.recovery_job", store, markers, execution_id,
            str(p["driver_branches"]), str(p["driver_step_ms"] / 1000), str(n)]


def _run_job(cmd: list[str], cwd: str) -> list[int]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=KILL_WAIT_SECONDS * 2, cwd=cwd)
    if out.returncode != 0:
        raise BenchError(f"recovery job failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _driver_kill(p: dict, n: int) -> list[Variant]:
    branches = p["driver_branches"]
    expected = recovery_job.expected(branches)

    def clean() -> Sample:
        with fresh_store(NAME) as (path, execution_id):
            markers = os.path.join(os.path.dirname(path), "markers")
            os.mkdir(markers)
            wall, out = timed(lambda: _run_job(_job(path, markers, execution_id, p, n), os.path.dirname(path)))
        check(out == expected, f"recovery job returned {out!r}")
        return Sample(wall)

    def killed() -> Sample:
        with fresh_store(NAME) as (path, execution_id):
            cwd = os.path.dirname(path)
            markers = os.path.join(cwd, "markers")
            os.mkdir(markers)
            cmd = _job(path, markers, execution_id, p, n)
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd,
                                    start_new_session=True)
            deadline = time.monotonic() + KILL_WAIT_SECONDS
            while len(counts(markers, "done")) < branches // 3 and proc.poll() is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(POLL_SECONDS)
            time.sleep(p["driver_step_ms"] / 2000)  # mid-step: the next branches are in flight
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate(timeout=KILL_WAIT_SECONDS)
            check(proc.returncode == -signal.SIGKILL, f"the job ended before the kill ({proc.returncode}): "
                                                      f"{err.decode(errors='replace')[-2000:]}")
            _wait_gone(proc.pid)
            started, done = set(counts(markers, "start")), set(counts(markers, "done"))
            in_flight = started - done
            committed = _committed(path, execution_id)
            wall, out = timed(lambda: _run_job(cmd, cwd))
            check(out == expected, f"resumed recovery job returned {out!r}")
            starts = counts(markers, "start")
            rerun = {i for i, c in starts.items() if c > 1}
        return Sample(wall, {"done_at_kill": len(done), "in_flight_at_kill": len(in_flight),
                             "committed_at_kill": len(committed), "rerun": len(rerun),
                             "rerun_not_in_flight": len(rerun - in_flight),
                             "rerun_committed": len(rerun & committed),
                             "finished_not_committed": len(done - committed)})

    work = dict(work=branches, unit="branches", group="driver SIGKILL")
    return [
        Variant("job, no fault (subprocess)", clean, **work, baseline=True),
        Variant("resume after driver kill", killed, **work, note="wall of the re-run only"),
    ]


def _wait_gone(pgid: int) -> None:
    """Wait until no process of the killed job's group is left (its workers die with it)."""
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(POLL_SECONDS)


def _committed(path: str, execution_id: str) -> set[int]:
    from durable_mp.store.facade import Store

    with Store(path) as store:
        return {int(r.name.rsplit("-", 1)[1]) for r in store.ops(execution_id)
                if r.sub_type == "ParallelBranch" and r.status == "SUCCEEDED"}


def run(p: dict, runner: Runner) -> ScenarioResult:
    n = workers()
    iterations = cpu.calibrate(p["step_ms"])
    try:
        rows = runner.measure(NAME, _worker_kill(p, n, iterations) + _driver_kill(p, n))
    finally:
        stop_helpers()
    res = ScenarioResult(NAME, TITLE, {**p, "workers": n, "iterations": iterations}, rows)
    crashed = res.row("durable_mp, 1 worker killed", "worker SIGKILL")
    ppe_row = res.row("ppe, 1 worker killed", "worker SIGKILL")
    resumed = res.row("resume after driver kill", "driver SIGKILL")
    res.facts = {
        "worker kill: death -> re-dispatch (ms, median)": _round(crashed.info_median("redispatch_ms"), 2),
        "worker kill: branches re-executed (median)": crashed.info_median("branches_rerun"),
        "worker kill: finished steps re-executed (median)": crashed.info_median("finished_steps_rerun"),
        "worker kill: ppe tasks lost to BrokenProcessPool (median)": ppe_row.info_median("tasks_lost"),
        "driver kill: branches done / in flight / committed at the kill (median)": (
            resumed.info_median("done_at_kill"), resumed.info_median("in_flight_at_kill"),
            resumed.info_median("committed_at_kill")),
        "driver kill: branches re-executed (median)": resumed.info_median("rerun"),
        "driver kill: re-executed but not in flight (max)": max(
            (s["rerun_not_in_flight"] for s in resumed.info), default=None),
        "driver kill: finished but not committed at the kill (max)": max(
            (s["finished_not_committed"] for s in resumed.info), default=None),
    }
    res.targets += [
        Target("recovery: worker kill, branches re-executed (max)",
               max((s["branches_rerun"] for s in crashed.info), default=None), 1, "<=", own=True),
        Target("recovery: worker kill, finished steps re-executed (max)",
               max((s["finished_steps_rerun"] for s in crashed.info), default=None), 0, "<=", own=True),
        Target("recovery: worker kill, death -> re-dispatch ms (median)",
               crashed.info_median("redispatch_ms"), 100, "<=", "ms", own=True),
        Target("recovery: driver kill, committed branches re-executed (max)",
               max((s["rerun_committed"] for s in resumed.info), default=None), 0, "<=", own=True),
    ]
    return res


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
