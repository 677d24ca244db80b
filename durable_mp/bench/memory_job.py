"""One run of the ``memory`` scenario, alone in a fresh process so its peak RSS is its own.

``python -m durable_mp.bench.memory_job {durable_mp|ppe} ITEMS WORKERS [STORE]``

Prints JSON: wall seconds, the driver's RSS before the run and its peak (bytes), the
largest RSS seen in one of its worker processes, and whether the results were right.

The driver's peak is ``VmHWM`` from ``/proc/self/status``, the high-water mark of this
process's own memory map.  ``getrusage().ru_maxrss`` would be wrong here: Linux carries
it across fork and exec, so a child of a big benchmark process starts with the parent's
peak.  Workers come and go with the pool, so their RSS is sampled every
``SAMPLE_SECONDS`` by a thread.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
import uuid

import psutil

from durable_mp import durable_execution


SAMPLE_SECONDS = 0.05


def peak_rss() -> int:
    """This process's peak RSS in bytes (``VmHWM``), or its current RSS where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return psutil.Process().memory_info().rss


class ChildWatch:
    """The largest RSS any child process showed while the watch ran."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(SAMPLE_SECONDS):
            for child in me.children(recursive=True):
                try:
                    self.peak = max(self.peak, child.memory_info().rss)
                except psutil.Error:
                    pass

    def __enter__(self) -> "ChildWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


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
    with ChildWatch() as watch:
        t0 = time.perf_counter()
        out = _run(mode, items, workers, store)
        wall = time.perf_counter() - t0
    ok = out == [items, items * (items - 1)]
    return {"wall": wall, "rss_before": before, "peak_rss": peak_rss(), "worker_peak_rss": watch.peak,
            "ok": ok, "result": out}


def _run(mode: str, items: int, workers: int, store: str | None) -> list:
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
    return out


def main(argv: list[str]) -> int:
    mode, items, workers = argv[0], int(argv[1]), int(argv[2])
    store = argv[3] if len(argv) > 3 else None
    if mode == "durable_mp" and store is None:
        raise SystemExit("durable_mp needs a store path")
    print(json.dumps(run(mode, items, workers, store)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

