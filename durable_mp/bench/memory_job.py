"""One run of the ``memory`` scenario, alone in a fresh process so its peak RSS is its own.

``python -m durable_mp.bench.memory_job {durable_mp|ppe} ITEMS WORKERS [STORE]``

Prints JSON: wall seconds, the driver's RSS before the run and its peak (bytes), the
largest peak of its worker processes, and whether the results were right.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
import uuid

import psutil

from durable_mp import durable_execution


def double(x: int) -> int:
    return 2 * x


def map_item(ctx, x: int, index: int, inputs: list) -> int:
    return 2 * x


@durable_execution
def map_handler(event: dict, context) -> list:
    result = context.map(range(event["items"]), map_item, name="memory")
    result.throw_if_error()
    values = result.get_results()
    return [len(values), sum(values)]


def run(mode: str, items: int, workers: int, store: str | None) -> dict:
    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if mode == "durable_mp":
        out = map_handler.run({"items": items}, store=store, execution_id=f"bench-memory-{uuid.uuid4().hex[:12]}",
                              max_workers=workers, progress=False)
    elif mode == "ppe":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        chunksize = max(1, math.ceil(items / (4 * workers)))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as ex:
            values = list(ex.map(double, range(items), chunksize=chunksize))
        out = [len(values), sum(values)]
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    wall = time.perf_counter() - t0
    ok = out == [items, items * (items - 1)]
    return {"wall": wall, "rss_before": before,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "worker_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "ok": ok, "result": out}


def main(argv: list[str]) -> int:
    mode, items, workers = argv[0], int(argv[1]), int(argv[2])
    store = argv[3] if len(argv) > 3 else None
    if mode == "durable_mp" and store is None:
        raise SystemExit("durable_mp needs a store path")
    print(json.dumps(run(mode, items, workers, store)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

