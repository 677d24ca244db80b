"""Turning scenario results into text tables, a markdown page and JSON."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import tempfile
from typing import Any

from durable_mp.bench.core import Row, ScenarioResult, Target

COLUMNS = ("variant", "runs", "median", "min", "max", "throughput", "ratio", "speedup")


# -- the machine ------------------------------------------------------------------------------
def machine() -> dict:
    """What the numbers depend on: CPUs, their model, Python, library versions, the temp filesystem."""
    import durable_mp

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "durable_mp": durable_mp.__version__,
        "durable_mp_git": _git_revision(os.path.dirname(durable_mp.__file__)),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memory_total_mb": _mem_total_mb(),
        "tempdir": tempfile.gettempdir(),
        "tempdir_fs": _fs_type(tempfile.gettempdir()),
    }
    for name in ("numpy", "joblib", "lmdb", "cloudpickle", "psutil"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    return info


def _git_revision(package_dir: str) -> str | None:
    """HEAD of the checkout durable_mp runs from, ``-dirty`` if its files differ; None if not a checkout."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", package_dir, *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_mb() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return None


def _fs_type(path: str) -> str | None:
    """The filesystem the temporary stores live on (tmpfs makes fsync free)."""
    best, fstype = "", None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and os.path.realpath(path).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, fstype = parts[1], parts[2]
    except OSError:
        pass
    return fstype


# -- numbers ---------------------------------------------------------------------------------
def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.3f} s"


def rate(value: float | None, unit: str | None) -> str:
    if value is None or unit is None:
        return "-"
    if value >= 10_000:
        return f"{value / 1000:,.1f} k {unit}/s"
    if value >= 100:
        return f"{value:,.0f} {unit}/s"
    return f"{value:.2f} {unit}/s"


def number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return " / ".join(number(v, digits) for v in value)
    return str(value)


def status(target: Target) -> str:
    met = target.met
    return "not measured" if met is None else ("met" if met else "NOT MET")


# -- tables ----------------------------------------------------------------------------------
def row_cells(res: ScenarioResult, row: Row) -> list[str]:
    name = row.variant + (" (baseline)" if row.baseline else "")
    if row.skipped:
        return [name, "0", f"skipped: {row.skipped}", "", "", "", "", ""] + ([""] if res.cores else [])
    ratio = res.ratio(row)
    base = res.baseline(row.group)
    speedup = base.median / row.median if base is not None and base.median and row.median else None
    cells = [name, str(len(row.samples)), seconds(row.median),
             seconds(min(row.samples) if row.samples else None), seconds(max(row.samples) if row.samples else None),
             rate(row.throughput, row.unit), number(ratio), "-" if speedup is None else f"{speedup:.2f}x"]
    if res.cores:
        cells.append("-" if speedup is None else f"{speedup / res.cores:.0%}")
    return cells


def _headers(res: ScenarioResult) -> list[str]:
    return list(COLUMNS) + (["efficiency"] if res.cores else [])


def _params(res: ScenarioResult) -> str:
    return ", ".join(f"{k}={v}" for k, v in res.params.items() if k not in ("skip",))


def _groups(res: ScenarioResult) -> list[str]:
    seen: list[str] = []
    for row in res.rows:
        if row.group not in seen:
            seen.append(row.group)
    return seen


def text_table(res: ScenarioResult) -> str:
    lines = [f"== {res.name}: {res.title} ==", f"   {_params(res)}"]
    if res.error:
        lines.append(f"   ERROR: {res.error.strip().splitlines()[-1]}")
    headers = _headers(res)
    body: list[list[str] | str] = []
    for group in _groups(res):
        if group:
            body.append(f"-- {group}")
        body.extend(row_cells(res, row) for row in res.rows if row.group == group)
    cells = [c for c in body if isinstance(c, list)]
    if cells:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        fmt = lambda cs: "   " + "  ".join(  # noqa: E731
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cs, widths)))
        lines.append(fmt(headers))
        for item in body:
            lines.append("   " + item if isinstance(item, str) else fmt(item))
    lines += [f"   {line}" for line in _footnotes(res)]
    lines.append(f"   (scenario took {res.seconds:.1f} s" + ("; ratio = median wall / baseline median wall)"
                                                            if res.rows else ")"))
    return "\n".join(lines)


def targets(results: list[ScenarioResult]) -> list[Target]:
    return [t for res in results for t in res.targets]


def text_summary(results: list[ScenarioResult]) -> str:
    rows = [[t.name + (" *" if t.own else ""), number(t.measured), f"{t.cmp} {number(t.target)}", status(t)]
            for t in targets(results)]
    lines = ["== targets =="]
    if rows:
        headers = ["target", "measured", "goal", "status"]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        for r in [headers] + rows:
            lines.append("   " + "  ".join(c.ljust(w) if i in (0, 3) else c.rjust(w)
                                          for i, (c, w) in enumerate(zip(r, widths))))
        if any(t.own for t in targets(results)):
            lines.append("   * the benchmark's own goal (durability or latency), not one set by the issue")
    errors = [res for res in results if res.error]
    for res in errors:
        lines.append(f"   ERROR in {res.name}: {res.error.strip().splitlines()[-1]}")
    return "\n".join(lines)


def markdown(results: list[ScenarioResult], meta: dict) -> str:
    m = meta["machine"]
    out = [f"# durable_mp benchmark, {meta['date'][:10]}", "",
           f"`{meta['command']}` on {m['cpus_usable']} CPUs ({m['cpu_model']}), Python {m['python']}, "
           f"durable_mp {m['durable_mp']} (git {m.get('durable_mp_git')}), numpy {m['numpy']}, joblib {m['joblib']}; "
           f"stores in {m['tempdir']} ({m['tempdir_fs']}). Medians of {meta['repeats']} repeats "
           f"(interleaved); ratio = median wall / baseline median wall. Load average at start "
           f"{_load(m.get('load_average'))}, at end {_load(meta.get('load_average_end'))}; "
           f"total {meta.get('seconds', 0):.0f} s.", ""]
    for res in results:
        out += [f"## {res.name}: {res.title}", "", f"Parameters: {_params(res)}", ""]
        if res.error:
            out += [f"**ERROR:** `{res.error.strip().splitlines()[-1]}`", ""]
        if res.rows:
            headers = ["group"] * any(r.group for r in res.rows) + _headers(res)
            out.append("| " + " | ".join(headers) + " |")
            out.append("|" + "|".join("---" if i == 0 or (headers[0] == "group" and i == 1) else "---:"
                                      for i in range(len(headers))) + "|")
            for row in res.rows:
                cells = row_cells(res, row)
                if headers[0] == "group":
                    cells = [row.group] + cells
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        out += [f"- {line}" for line in _footnotes(res)]
        out.append("")
    out += ["## Targets", "", "| target | measured | goal | status |", "|---|---:|---:|---|"]
    for t in targets(results):
        out.append(f"| {t.name}{' *' if t.own else ''} | {number(t.measured)} | {t.cmp} {number(t.target)} | "
                   f"{status(t)} |")
    out += ["", "\\* the benchmark's own goal (durability or latency), not one set by the issue", ""]
    return "\n".join(out)


def _load(values: list | None) -> str:
    return "?" if not values else " / ".join(f"{v:.2f}" for v in values)


def to_json(results: list[ScenarioResult], meta: dict) -> dict:
    scenarios = {}
    for res in results:
        scenarios[res.name] = {
            "title": res.title,
            "params": res.params,
            "seconds": res.seconds,
            "error": res.error,
            "rows": [{
                "variant": row.variant, "group": row.group, "baseline": row.baseline, "skipped": row.skipped,
                "note": row.note, "samples_s": row.samples, "median_s": row.median, "work": row.work,
                "unit": row.unit, "throughput_per_s": row.throughput, "ratio_to_baseline": res.ratio(row),
                "sample_info": row.info,
            } for row in res.rows],
            "facts": {k: v for k, v in res.facts.items()},
            "targets": [_target_json(t) for t in res.targets],
            "notes": res.notes,
        }
    return {**meta, "scenarios": scenarios, "targets": [_target_json(t) for t in targets(results)],
            "ok": not any(res.error for res in results)}


def _target_json(t: Target) -> dict:
    return {"name": t.name, "measured": t.measured, "target": t.target, "cmp": t.cmp, "unit": t.unit,
            "own": t.own, "met": t.met}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def _footnotes(res) -> list[str]:
    """A scenario's facts and notes, the same in the text and the markdown report."""
    lines = [f"{key}: {number(value)}" for key, value in res.facts.items()]
    lines += [f"note: {row.variant}{' [' + row.group + ']' if row.group else ''}: {row.note}"
              for row in res.rows if row.note and not row.skipped]
    return lines + list(res.notes)
