"""One run of the ``replay``/``growth`` scenarios, alone in a fresh process so its CPU and peak RSS are its own.

``python -m durable_mp.bench.replay_job MODE ITEMS WORKERS STORE EXEC_ID [MARKS] [RESULT_MB]``

MODE ``run``: run (or re-run) the map execution and print JSON with wall, the driver's own
CPU (user + sys of this process, not its workers) and its peak RSS (``VmHWM``).
``MARKS`` (a file) collects ``time.time()`` of every branch body start, so the parent can
tell when the first unfinished item was dispatched after a resume.
MODE ``big``: ``ITEMS`` branches that each return ``RESULT_MB`` MB of bytes.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

from durable_mp import durable_execution
from durable_mp.bench.memory_job import peak_rss

MB = 1 << 20


def _mark(marks: str) -> None:
    if marks:
        fd = os.open(marks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{time.time():.6f}\n".encode())
        finally:
            os.close(fd)


def map_item(ctx, x: int, index: int, inputs: list) -> int:
    marks = os.environ.get("DMP_BENCH_MARKS", "")
    if marks and not getattr(map_item, "marked", False):
        map_item.marked = True  # type: ignore[attr-defined]  # one mark per worker process is enough
        _mark(marks)
    return 2 * x


@durable_execution
def map_handler(event: dict, context) -> list:
    result = context.map(range(event["items"]), map_item, name="growth")
    result.throw_if_error()
    values = result.get_results()
    return [len(values), sum(values)]


def big_item(ctx, x: int, index: int, inputs: list) -> bytes:
    return bytes([x % 256]) * (inputs[index] * MB)


@durable_execution
def big_handler(event: dict, context) -> list:
    result = context.map([event["mb"]] * event["items"], big_item, name="growth-big")
    result.throw_if_error()
    return [len(r) for r in result.get_results()]


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main(argv: list[str]) -> int:
    mode, items, workers, store, exec_id = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4]
    if len(argv) > 5 and argv[5]:
        os.environ["DMP_BENCH_MARKS"] = argv[5]
    result_mb = int(argv[6]) if len(argv) > 6 else 1
    cpu0, t_start = _cpu(), time.time()
    t0 = time.perf_counter()
    if mode == "run":
        out = map_handler.run({"items": items}, store=store, execution_id=exec_id, max_workers=workers,
                              progress=False)
        ok = out == [items, items * (items - 1)]
    elif mode == "big":
        out = big_handler.run({"items": items, "mb": result_mb}, store=store, execution_id=exec_id,
                              max_workers=workers, progress=False)
        ok = out == [result_mb * MB] * items
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "cpu": _cpu() - cpu0, "peak_rss": peak_rss(), "t_start": t_start, "ok": ok}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
