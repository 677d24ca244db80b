"""What every scenario shares: result records, the measuring loop, fresh stores, progress.

A scenario compares *variants* of the same work (a serial loop, ``ProcessPoolExecutor``,
joblib, durable_mp).  ``Runner.measure`` runs them interleaved, one repeat of each variant
after the other, so a burst of load from elsewhere on the machine hits every variant
alike, and the tables report medians.  A variant times itself (``Sample``), because only
it knows which part is the work and which is set-up (a temporary store directory).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


class BenchError(Exception):
    """A scenario produced a wrong result (as opposed to a slow one, which is never an error)."""


@dataclass
class Sample:
    """One timed run of one variant: wall seconds and whatever else it measured."""

    wall: float
    info: dict = field(default_factory=dict)


@dataclass
class Variant:
    """A way of doing the scenario's work.  ``run`` does it once and returns its ``Sample``.

    ``warm`` (optional) is run once, untimed, before the first repeat: it pays for
    imports, first-touch page faults and joblib's executor start.  ``skipped`` names why
    the variant cannot run here (joblib not installed); it is reported, not run.
    """

    name: str
    run: Callable[[], Sample] | None
    warm: Callable[[], Any] | None = None
    work: float | None = None  # units of work per run (items, MB, branches)
    unit: str | None = None  # what ``work`` counts; throughput is ``work / median`` per second
    baseline: bool = False
    group: str = ""  # rows are compared with the baseline of their own group
    skipped: str | None = None
    note: str | None = None


@dataclass
class Row:
    """The measured side of a variant: its samples and what they add up to."""

    variant: str
    group: str
    samples: list[float]
    work: float | None = None
    unit: str | None = None
    baseline: bool = False
    skipped: str | None = None
    note: str | None = None
    info: list[dict] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def throughput(self) -> float | None:
        median = self.median
        if self.work is None or not median:
            return None
        return self.work / median

    def info_median(self, key: str) -> float | None:
        values = [s[key] for s in self.info if s.get(key) is not None]
        return statistics.median(values) if values else None


@dataclass
class Target:
    """A goal from the issue: ``measured <cmp> target``.  ``met`` is None when not measured."""

    name: str
    measured: float | None
    target: float
    cmp: str  # ">=" or "<="
    unit: str = ""
    own: bool = False  # a goal the benchmark sets itself, not one from the issue

    @property
    def met(self) -> bool | None:
        if self.measured is None or (isinstance(self.measured, float) and math.isnan(self.measured)):
            return None
        return self.measured >= self.target if self.cmp == ">=" else self.measured <= self.target


@dataclass
class ScenarioResult:
    name: str
    title: str
    params: dict
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    facts: dict = field(default_factory=dict)  # scenario-level measurements shown under the table
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    cores: int | None = None  # set when the table should show efficiency = speedup / cores

    def row(self, variant: str, group: str = "") -> Row | None:
        for row in self.rows:
            if row.variant == variant and row.group == group:
                return row
        return None

    def baseline(self, group: str = "") -> Row | None:
        for row in self.rows:
            if row.baseline and row.group == group:
                return row
        return None

    def ratio(self, row: Row) -> float | None:
        """``row``'s median wall divided by its group baseline's (1.0 for the baseline)."""
        base = self.baseline(row.group)
        if base is None or base.median is None or row.median is None or not base.median:
            return None
        return row.median / base.median

    def compare(self, variant: str, other: str, group: str = "") -> float | None:
        """Median wall of ``variant`` / median wall of ``other`` (None if either is missing)."""
        a, b = self.row(variant, group), self.row(other, group)
        if a is None or b is None or a.median is None or not b.median:
            return None
        return a.median / b.median


class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, stream: Any = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self._shown = False

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        line = f"[bench {time.monotonic() - self.t0:6.1f}s] {text}"
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            self._shown = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self.tty and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


class Runner:
    """Runs variants interleaved over ``repeats`` and turns their samples into rows."""

    def __init__(self, repeats: int, *, warmup: bool = True, progress: Progress | None = None) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.repeats = repeats
        self.warmup = warmup
        self.progress = progress or Progress(enabled=False)

    def measure(self, scenario: str, variants: list[Variant], repeats: int | None = None) -> list[Row]:
        repeats = repeats or self.repeats
        live = [v for v in variants if v.skipped is None and v.run is not None]
        rows = {id(v): Row(v.name, v.group, [], v.work, v.unit, v.baseline, v.skipped, v.note) for v in variants}
        if self.warmup:
            for v in live:
                if v.warm is not None:
                    self.progress.show(f"{scenario}: warming up {_label(v)}")
                    v.warm()
        for rep in range(repeats):
            for v in live:
                self.progress.show(f"{scenario}: {_label(v)}  repeat {rep + 1}/{repeats}")
                sample = v.run()
                rows[id(v)].samples.append(sample.wall)
                rows[id(v)].info.append(sample.info)
        return [rows[id(v)] for v in variants]


def _label(v: Variant) -> str:
    return f"{v.group} {v.name}" if v.group else v.name


def timed(func: Callable[[], Any]) -> tuple[float, Any]:
    """``(wall seconds, func())``."""
    t0 = time.perf_counter()
    out = func()
    return time.perf_counter() - t0, out


@contextlib.contextmanager
def fresh_store(tag: str) -> Iterator[tuple[str, str]]:
    """``(store path, execution id)``, both new; the directory is removed afterwards.

    Every durable_mp run of the benchmark gets its own store, so no run replays another's
    checkpoints and nothing is left in the working directory.
    """
    root = tempfile.mkdtemp(prefix=f"durable_mp-bench-{tag}-")
    try:
        yield os.path.join(root, "store"), f"bench-{tag}-{uuid.uuid4().hex[:12]}"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds of this process (every thread) and of its reaped children (finished workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime  # µs resolution (os.times: 10 ms)


def timed_cpu(func: Callable[[], Any], cpu: dict[str, float]) -> tuple[float, Any]:
    """``timed``, also filling ``cpu`` with ``driver_s`` and ``workers_s``: CPU seconds of this
    process and of the children reaped meanwhile (a pool's workers, once it shuts down)."""
    before = cpu_seconds()
    wall, out = timed(func)
    after = cpu_seconds()
    cpu["driver_s"], cpu["workers_s"] = after[0] - before[0], after[1] - before[1]
    return wall, out


def run_durable(handler: Any, event: Any, tag: str, *, inspect: Callable[[str, str], Any] | None = None,
                cpu: dict[str, float] | None = None, **options: Any) -> tuple[float, Any, Any]:
    """Run a durable handler once on a fresh store: ``(wall seconds, result, inspect(path, id))``.

    The wall time covers ``handler.run`` only: opening the store, forking the workers,
    the work, the last commit and shutting the workers down.  ``cpu``: filled as by ``timed_cpu``.
    """
    with fresh_store(tag) as (path, execution_id):
        options.setdefault("progress", False)
        wall, result = timed_cpu(lambda: handler.run(event, store=path, execution_id=execution_id, **options),
                                 cpu if cpu is not None else {})
        seen = inspect(path, execution_id) if inspect is not None else None
    return wall, result, seen


def run_map(func: Callable[[Any], Any], items: list, tag: str, *, cpu: dict[str, float] | None = None,
            **options: Any) -> tuple[float, Any]:
    """``durable_mp.map(func, items)`` once on a fresh store: ``(wall seconds, result)``, as ``run_durable``."""
    import durable_mp

    with fresh_store(tag) as (path, _execution_id):
        options.setdefault("progress", False)
        return timed_cpu(lambda: durable_mp.map(func, items, store=path, **options), cpu if cpu is not None else {})


def count_records(path: str, execution_id: str) -> dict:
    """How many operation records the store holds for the execution, by sub-type and status."""
    from durable_mp.store.facade import Store

    with Store(path) as store:
        records = store.ops(execution_id)
    by_kind: dict[str, int] = {}
    for rec in records:
        key = f"{rec.sub_type}:{rec.status}"
        by_kind[key] = by_kind.get(key, 0) + 1
    return {"records": len(records), "by_kind": by_kind}


def workers() -> int:
    """The worker count every pool of the benchmark uses: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def skipped_without_numpy(name: str, title: str, params: dict) -> ScenarioResult | None:
    """A result that says the scenario was skipped if numpy is missing; None if numpy is there."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        res = ScenarioResult(name, title, params)
        res.notes.append("skipped: numpy is not installed")
        return res
    return None


def joblib_or_none() -> Any:
    try:
        import joblib
    except ImportError:
        return None
    return joblib


def stop_helpers() -> None:
    """Stop joblib's reusable loky workers, so no worker process outlives its scenario.

    joblib restarts them on its next use.  The resource-tracker processes of loky and
    multiprocessing are left alone: they exit with this process, and stopping one early
    makes it report joblib's still-registered temporary folders as leaked.
    """
    if joblib_or_none() is None:
        return
    try:
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)
    except Exception:  # noqa: BLE001 - best effort: a joblib without loky
        pass


def joblib_parallel(joblib, n_jobs: int) -> Any:
    """joblib's ``Parallel`` as users call it (loky, ``batch_size='auto'``).

    Memmapping is off: it only applies to large *inputs*, and the scenarios pass small ones.
    """
    return joblib.Parallel(n_jobs=n_jobs, max_nbytes=None)


def ppe(max_workers: int) -> Any:
    """A ``ProcessPoolExecutor`` that forks, like durable_mp's pool (the default changes in 3.14)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=max_workers, mp_context=multiprocessing.get_context("fork"))


def check(condition: bool, message: str) -> None:
    if not condition:
        raise BenchError(message)
