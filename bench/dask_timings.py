"""Dask backend timings next to plain ``client.map`` on one real cluster (issue 20's three workloads).

    PYTHONPATH=. python bench/dask_timings.py

200 CPU-bound items (~0.1 s each), 2000 trivial items, 40 results of 16 MiB; each run
by durable_mp (a fresh store) and by ``client.map`` + ``gather``, one after the other,
on a scheduler and two ``dask worker --nthreads 1`` processes.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dask_cluster import RealCluster  # noqa: E402

from durable_mp import durable_execution  # noqa: E402


def spin(x: int) -> int:
    total = 0
    for i in range(600_000):  # about 0.1 s of one core
        total += i ^ x
    return total


def small(x: int) -> int:
    return x + 1


def big(x: int) -> bytes:
    return os.urandom(64) * (2**18)  # 16 MiB


WORKLOADS = [("200 CPU items (~0.1 s)", spin, 200), ("2000 small items", small, 2000),
             ("40 x 16 MiB results", big, 40)]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = RealCluster(Path(tmp) / "cluster", 2)
        try:
            client = cluster.client(workers=2)
            print("| workload | durable_mp on Dask | client.map |\n|---|---|---|")
            for n, (name, func, count) in enumerate(WORKLOADS):
                @durable_execution
                def handler(event, ctx, func=func, count=count):
                    return len(ctx.map(list(range(count)), lambda c, x, i, xs: func(x)).get_results())

                started = time.monotonic()
                assert handler.run(None, store=str(Path(tmp) / f"store{n}"), backend=client) == count
                durable = time.monotonic() - started
                started = time.monotonic()
                assert len(client.gather(client.map(func, range(count), pure=False))) == count
                plain = time.monotonic() - started
                print(f"| {name} | {durable:.2f} s | {plain:.2f} s |", flush=True)
            client.close()
        finally:
            cluster.close()


if __name__ == "__main__":
    main()
