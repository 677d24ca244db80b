"""Dask backend timings next to plain ``client.map`` on one real cluster (issue 20's three workloads).

    PYTHONPATH=. python bench/dask_timings.py                          # this tree, one round
    PYTHONPATH=. python bench/dask_timings.py --rounds 3 /tmp/old .    # trees interleaved, medians

200 CPU-bound items (~0.1 s each), 2000 trivial items, 40 results of 16 MiB; each run
by durable_mp (a fresh store) and by ``client.map`` + ``gather``, one after the other,
on a scheduler and two ``dask worker --nthreads 1`` processes.  Each tree is measured in
a process of its own whose driver *and* workers import that tree's durable_mp (checked),
on a cluster of its own; the trees take turns, round after round, so a busy machine
weighs on each alike.  Both the driver and the workers are warmed up (imports, first
tasks) before anything is timed.  Prints each round and a table of medians (min-max).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"  # tests/dask_cluster.py of this tree starts the cluster for every tree


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


def measure(tree: Path) -> dict[str, list[float]]:
    """In this process (``tree`` first on its path): {workload: [durable_mp seconds, client.map seconds]}."""
    sys.path.insert(0, str(TESTS))
    from dask_cluster import RealCluster

    import durable_mp
    from durable_mp import durable_execution

    assert Path(durable_mp.__file__).resolve().is_relative_to(tree.resolve()), (durable_mp.__file__, tree)
    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.pathsep.join([str(tree), str(TESTS), str(HERE)])
        cluster = RealCluster(Path(tmp) / "cluster", 2, env={"PYTHONPATH": path})
        try:
            client = cluster.client(workers=2)
            where = client.run(lambda: __import__("durable_mp").__file__)
            assert all(Path(f).resolve().is_relative_to(tree.resolve()) for f in where.values()), where
            for n, (name, func, count) in enumerate(WORKLOADS):
                @durable_execution
                def handler(event, ctx, func=func, count=count):
                    return len(ctx.map(list(range(event)), lambda c, x, i, xs: func(x)).get_results())

                # warm: the workers import durable_mp and the driver its store before anything is timed
                assert handler.run(4, store=str(Path(tmp) / f"warm{n}"), backend=client) == 4
                assert len(client.gather(client.map(func, range(4), pure=False))) == 4
                started = time.monotonic()
                assert handler.run(count, store=str(Path(tmp) / f"store{n}"), backend=client) == count
                durable = time.monotonic() - started
                started = time.monotonic()
                assert len(client.gather(client.map(func, range(count), pure=False))) == count
                out[name] = [durable, time.monotonic() - started]
            client.close()
        finally:
            cluster.close()
    return out


def compare(trees: list[Path], rounds: int) -> None:
    runs: dict[str, list[dict[str, list[float]]]] = {str(t): [] for t in trees}
    for r in range(rounds):
        order = trees if r % 2 == 0 else list(reversed(trees))  # neither tree always goes first
        for tree in order:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(TESTS)])}
            proc = subprocess.run([sys.executable, __file__, "--one", str(tree)], env=env, cwd=tree,
                                  capture_output=True, text=True, timeout=1800)
            if proc.returncode:
                sys.exit(f"{tree} failed:\n{proc.stdout}\n{proc.stderr}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[str(tree)].append(result)
            print(f"round {r + 1}, {tree}: " + "; ".join(
                f"{name}: {d:.2f} s / client.map {p:.2f} s" for name, (d, p) in result.items()), flush=True)
    print(f"\nmedians of {rounds} rounds (min-max); ratio = durable_mp / client.map of the same run\n")
    print("| workload | tree | durable_mp on Dask | client.map | ratio |\n|---|---|---|---|---|")
    for name, _, _ in WORKLOADS:
        for tree in trees:
            d = [run[name][0] for run in runs[str(tree)]]
            p = [run[name][1] for run in runs[str(tree)]]
            ratio = [a / b for a, b in zip(d, p, strict=True)]
            print(f"| {name} | {tree} | {_spread(d)} s | {_spread(p)} s | {_spread(ratio)} |")


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv: list[str]) -> None:
    if argv[:1] == ["--one"]:
        print(json.dumps(measure(Path(argv[1]))))
        return
    rounds = 1
    if argv[:1] == ["--rounds"]:
        rounds, argv = int(argv[1]), argv[2:]
    compare([Path(t).resolve() for t in (argv or ["."])], rounds)


if __name__ == "__main__":
    main(sys.argv[1:])
