"""The command line: pick scenarios, run them, print tables and the target summary, save results.

Exit status: 0 when every scenario ran and its results were right, 1 when one raised or
produced a wrong result, 2 on bad arguments.  Missing a timing target never fails the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from durable_mp.bench import DEFAULT_REPEATS, QUICK_REPEATS, SCENARIOS, run_scenario
from durable_mp.bench import report
from durable_mp.bench.core import Progress, Runner


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m durable_mp.bench",
        description="durable_mp against serial code, ProcessPoolExecutor and joblib, in the same run.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and fewer repeats: under a minute on 2 cores (no memory scenario)")
    parser.add_argument("--only", metavar="SCENARIO[,..]",
                        help=f"run only these scenarios (of: {', '.join(SCENARIOS)})")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help=f"timed repeats per variant (default {DEFAULT_REPEATS}, {QUICK_REPEATS} with --quick)")
    parser.add_argument("--json", metavar="FILE", help="write machine-readable results (raw samples included)")
    parser.add_argument("--markdown", metavar="FILE", help="write the tables as markdown")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each variant")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    names = list(SCENARIOS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in SCENARIOS]
        if unknown:
            parser.error(f"unknown scenario(s): {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    progress = Progress(enabled=not args.no_progress)
    runner = Runner(repeats, warmup=not args.no_warmup, progress=progress)
    meta = {"date": report.now_iso(), "machine": report.machine(), "quick": args.quick, "repeats": repeats,
            "command": "python -m durable_mp.bench " + shlex.join(sys.argv[1:] if argv is None else argv)}
    results = []
    for name in args.names:
        progress.show(f"{name}: starting")
        res = run_scenario(name, runner, quick=args.quick)
        progress.clear()
        if res.error:
            print(res.error, file=sys.stderr)
        print(report.text_table(res), flush=True)
        print(flush=True)
        results.append(res)
    progress.clear()
    meta["seconds"] = time.monotonic() - progress.t0
    meta["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(report.text_summary(results))
    print(f"(total {meta['seconds']:.1f} s; load average at start {_load(meta['machine']['load_average'])}, "
          f"at end {_load(meta['load_average_end'])})")
    if args.json:
        _write(args.json, json.dumps(report.to_json(results, meta), indent=2, default=str) + "\n")
    if args.markdown:
        _write(args.markdown, report.markdown(results, meta))
    return 1 if any(res.error for res in results) else 0


def _load(values: list | None) -> str:
    return "?" if not values else " ".join(f"{v:.2f}" for v in values)


def _write(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
