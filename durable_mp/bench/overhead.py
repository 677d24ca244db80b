"""``overhead``: ``context.map`` over 10,000 and 100,000 trivial items, every item durably checkpointed.

What is left when the work is nothing: durable_mp's per-item cost (ship the item, record,
pipe, group commit) against ``ProcessPoolExecutor.map`` with a good chunksize and joblib's
auto batching, neither of which records anything.  The store's record count after the run
shows that each item really got its own checkpoint.  Targets (issue 23, target 1), at each
size: >= 300,000 checkpointed items/s, and at least joblib's throughput in the same run.

The physical limit beside it (issue 23 target 6, ``bench.limits``): LMDB alone, putting as
many records of an item record's size, all in one synced commit (perfect group commit), and
the cost of one synced commit per record (no batching, in the facts, per record).
"""

from __future__ import annotations

import math
import tempfile

from durable_mp import durable_execution
from durable_mp.bench import limits
from durable_mp.bench.core import (Runner, Sample, ScenarioResult, Target, Variant, check, count_records,
                                   joblib_or_none, joblib_parallel, ppe, run_durable, run_map, stop_helpers, timed,
                                   timed_cpu,
                                   workers)

NAME = "overhead"
TITLE = "map over trivial items: per-item overhead"

# A repeat takes a fraction of a second, so one burst of load elsewhere could hit them all:
# this scenario runs this many times the requested repeats, spread over a longer stretch.
REPEAT_FACTOR = 3
COMMITS = 200  # synced LMDB commits timed for the per-record cost


TARGET_ITEMS_PER_S = 300_000  # issue 23 target 1, at 10k and 100k items
TARGET_VS_JOBLIB = 1.0  # durable_mp.map items/s / joblib items/s, same run


def params(quick: bool) -> dict:
    return {"items": [10_000] if quick else [10_000, 100_000]}


def double(x: int) -> int:
    return 2 * x


def map_item(ctx, x: int, index: int, inputs: list) -> int:
    return 2 * x


@durable_execution
def map_handler(event: dict, context) -> list[int]:
    result = context.map(list(range(event["items"])), map_item, name="overhead")
    result.throw_if_error()
    return result.get_results()


def per_item_cpu(cpu: dict[str, float], items: int) -> dict[str, float]:
    """Microseconds of driver and worker CPU per item (``timed_cpu``'s seconds over the items)."""
    return {"driver": cpu["driver_s"] / items * 1e6, "workers": cpu["workers_s"] / items * 1e6}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def run(p: dict, runner: Runner) -> ScenarioResult:
    """Every size in ``p["items"]`` (an int: one size, rows ungrouped), each variant beside the others."""
    n = workers()
    sizes = p["items"] if isinstance(p["items"], list) else [p["items"]]
    joblib = joblib_or_none()
    variants: list[Variant] = []
    groups = {}
    for size in sizes:
        group = f"{size:,} items" if isinstance(p["items"], list) else ""
        groups[group] = size
        variants += _variants(size, group, n, joblib)
    try:
        rows = runner.measure(NAME, variants, repeats=runner.repeats * REPEAT_FACTOR)
    finally:
        stop_helpers()
    res = ScenarioResult(NAME, TITLE, {**p, "workers": n, "ppe_chunksize": [_chunksize(s, n) for s in sizes]}, rows)
    record_bytes = 100
    per_commit = limits.lmdb_commit_seconds(COMMITS, record_bytes, tempfile.gettempdir(), per_record=True) / COMMITS
    res.facts["lmdb: one synced commit per record (us per record)"] = round(per_commit * 1e6, 1)
    for group in groups:
        at = f"{group}: " if group else ""
        dmp = res.row("durable_mp.map", group)
        res.facts[f"{at}records in the store after a durable_mp run"] = dmp.info_median("records")
        res.facts[f"{at}of which succeeded map items"] = dmp.info_median("item_records")
        for name, row in (("durable_mp", dmp), ("ppe", res.row("ppe", group))):
            for part in ("driver", "workers"):
                res.facts[f"{at}{name}: {part} CPU per item, start-up included (us, median)"] = _round(
                    row.info_median(part))
        batch = res.row("lmdb (one commit)", group)
        res.facts[f"{at}durable_mp.map wall / lmdb one-commit limit wall"] = limits.ratio(
            dmp.median, batch.median if batch else None)
        label = f" ({group})" if group else ""
        res.targets.append(Target(f"overhead: durable_mp.map items/s{label}", dmp.throughput, TARGET_ITEMS_PER_S,
                                  ">=", "items/s"))
        # items/s ratio = inverse wall ratio
        res.targets.append(Target(f"overhead: durable_mp.map items/s / joblib items/s{label}",
                                  res.compare("joblib", "durable_mp.map", group), TARGET_VS_JOBLIB, ">=", "x"))
    return res


def _chunksize(size: int, n: int) -> int:
    return max(1, math.ceil(size / (4 * n)))


def _variants(size: int, group: str, n: int, joblib) -> list[Variant]:
    """The five ways of mapping ``size`` trivial items, as rows of ``group``."""
    items = list(range(size))
    expected = [2 * x for x in items]
    chunksize = _chunksize(size, n)

    def pool(todo=items) -> Sample:
        def go():
            with ppe(n) as ex:
                return list(ex.map(double, todo, chunksize=chunksize))
        cpu: dict[str, float] = {}
        wall, out = timed_cpu(go, cpu)
        if todo is items:
            check(out == expected, "ProcessPoolExecutor results differ")
        return Sample(wall, per_item_cpu(cpu, len(todo)))

    def with_joblib(todo=items) -> Sample:
        wall, out = timed(lambda: joblib_parallel(joblib, n)(joblib.delayed(double)(x) for x in todo))
        if todo is items:
            check(list(out) == expected, "joblib results differ")
        return Sample(wall)

    def durable(count=len(items)) -> Sample:
        cpu: dict[str, float] = {}
        wall, out, seen = run_durable(map_handler, {"items": count}, NAME, max_workers=n, inspect=count_records,
                                      cpu=cpu)
        if count == len(items):
            check(out == expected, "durable_mp map results differ")
            done = seen["by_kind"].get("MapIteration:SUCCEEDED", 0)
            check(done == count, f"the store holds {done} succeeded map-item records, expected {count}")
        return Sample(wall, {"records": seen["records"], "item_records": seen["by_kind"].get("MapIteration:SUCCEEDED"),
                             **per_item_cpu(cpu, count)})

    def public_map(todo=items) -> Sample:
        cpu: dict[str, float] = {}
        wall, out = run_map(double, todo, NAME, max_workers=n, cpu=cpu)
        if todo is items:
            check(out == expected, "durable_mp.map() results differ")
        return Sample(wall, per_item_cpu(cpu, len(todo)))

    record_bytes = 100  # about an item's record: header, key, a small pickled result
    scratch = tempfile.gettempdir()  # where run_durable makes its stores

    def lmdb_batch(count=len(items)) -> Sample:
        return Sample(limits.lmdb_commit_seconds(count, record_bytes, scratch, per_record=False))

    work = dict(work=len(items), unit="items", group=group)
    return [
        Variant("ppe", pool, lambda: pool(items[:100]), **work, baseline=True,
                note=f"chunksize={chunksize}, executor started inside the timing"),
        Variant("joblib", with_joblib if joblib else None, lambda: with_joblib(items[:100]), **work,
                skipped=None if joblib else "joblib is not installed", note="batch_size='auto', loky reused"),
        Variant("lmdb (one commit)", lmdb_batch, lambda: lmdb_batch(100), **work,
                note=f"limit: as many {record_bytes}-byte records put into LMDB, one synced commit"),
        Variant("durable_mp.map", durable, lambda: durable(100), **work, note="every item checkpointed"),
        Variant("durable_mp.map()", public_map, lambda: public_map(items[:100]), **work,
                note="the public call: identity and item keys hashed, every item checkpointed"),
    ]
