"""The facts about crashes and driver runs that ``show``, ``history`` and ``report`` share.

Plain data, derived by ``inspect.runs.crash_facts``; kept apart so the tree renderer can
print them without importing the derivation (which needs the tree).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEATH_TYPES = frozenset({"WorkerCrashedError", "MemoryLimitExceededError", "StepTimeoutError"})
CRASH_TYPE = "WorkerCrashedError"


@dataclass(frozen=True)
class DriverRun:
    """One driver's run of the execution (one invocation)."""

    number: int
    start: float
    end: float
    finished: bool  # False: the driver stopped (killed / interrupted) before the execution ended
    running: bool = False  # the current run, driver alive
    failed: bool = False  # the run ended with the execution FAILED; a later run resumed it (fix and resume)


@dataclass(frozen=True)
class WorkerDeath:
    """A worker that died (or was killed for a timeout / memory limit) while running ``op_id``."""

    op_id: str
    name: str
    pid: int
    ts: float
    attempt: int
    error: dict
    kind: str  # WorkerCrashedError | MemoryLimitExceededError | StepTimeoutError


@dataclass
class CrashFacts:
    runs: list[DriverRun]
    deaths: list[WorkerDeath]
    redispatched: set[str] = field(default_factory=set)  # branch op ids that ran again
    failed_branches: list[str] = field(default_factory=list)
    ran_in_run: dict[int, int] = field(default_factory=dict)  # run number -> branches finished in it
    reran_after_resume: set[str] = field(default_factory=set)  # branch op ids started before a resume, finished after

    @property
    def crashes(self) -> int:
        return sum(1 for d in self.deaths if d.kind == CRASH_TYPE)

    @property
    def kills(self) -> int:
        return sum(1 for d in self.deaths if d.kind != CRASH_TYPE)

    def summary(self) -> dict:
        """The counts every view prints (JSON-ready)."""
        return {
            "runs": len(self.runs),
            "worker_crashes": self.crashes,
            "worker_kills": self.kills,
            "redispatched": len(self.redispatched),
            "failed_branches": len(self.failed_branches),
            "reran_after_resume": len(self.reran_after_resume),
            "ran_in_resumed_runs": sum(n for k, n in self.ran_in_run.items() if k > 1),
        }

    def sentence(self) -> str:
        """One line for ``show``: empty when nothing crashed and nothing was resumed."""
        s = self.summary()
        parts = []
        if len(self.runs) > 1:
            stopped = sum(1 for r in self.runs if not r.finished and not r.running)
            failed = sum(1 for r in self.runs if r.failed)
            how = ([f"{stopped} stopped before finishing"] * bool(stopped)
                   + [f"{failed} ended FAILED, then resumed"] * bool(failed))
            parts.append(f"{len(self.runs)} driver runs" + (f" ({', '.join(how)})" if how else ""))
        if self.deaths:
            parts.append(f"{s['worker_crashes']} worker crash(es), {s['worker_kills']} kill(s) (timeout / memory)")
        if self.deaths or self.redispatched:
            parts.append(f"{s['redispatched']} branch(es) re-dispatched")
        if len(self.runs) > 1:
            parts.append(f"{s['reran_after_resume']} branch(es) started before a resume re-ran after it, "
                         f"{s['ran_in_resumed_runs']} finished in resumed runs")
        if self.failed_branches:
            parts.append(f"{s['failed_branches']} branch(es) failed")
        return "; ".join(parts)
