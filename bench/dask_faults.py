"""Fault table of the Dask backend next to plain ``client.map``, on a real cluster (issue 20).

    PYTHONPATH=. python bench/dask_faults.py [items] [seconds-per-item] [fault names, comma-separated]

Each fault runs on a fresh cluster (``dask scheduler`` and two ``dask worker --nthreads 1
--nanny`` processes on loopback, Dask's default config), once with durable_mp and once
with ``client.map``.  Items log each run to a file, so re-runs are counted exactly.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import dask
import distributed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dask_cluster import RealCluster  # noqa: E402

from durable_mp import durable_execution  # noqa: E402
from durable_mp.backends.dask import CLUSTER_WAIT_KEY  # noqa: E402
from durable_mp.config import CompletionConfig, MapConfig  # noqa: E402
from durable_mp.exceptions import ClusterUnavailableError  # noqa: E402
from durable_mp.store.facade import Store  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 0.1
GUILTY = 7  # in the "kills its worker" fault


def make_item(log: Path, guilty: int | None):
    def item(x: int) -> int:
        if x == guilty:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(SECONDS)
        with open(log, "a") as f:
            f.write(f"{x}\n")
        return x * 2
    return item


def runs(log: Path) -> list[int]:
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def when_ran(log: Path, count: int, action) -> None:
    def watch() -> None:
        deadline = time.monotonic() + 120
        while len(runs(log)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        action()
    threading.Thread(target=watch, daemon=True).start()


def inject(fault: str, cluster: RealCluster, client: distributed.Client, log: Path) -> None:
    if fault == "one worker killed":
        pid = cluster.worker_pids(client)[0]
        when_ran(log, N // 3, lambda: os.kill(pid, signal.SIGKILL))
    elif fault == "both workers killed":
        pids = cluster.worker_pids(client)
        when_ran(log, N // 3, lambda: [os.kill(p, signal.SIGKILL) for p in pids])
    elif fault == "scheduler killed":
        when_ran(log, N // 3, cluster.kill_scheduler)
    elif fault == "no workers (one joins after 3 s)":
        threading.Timer(3.0, cluster.add_worker).start()


def durable_run(fault: str, tmp: Path) -> str:
    cluster = RealCluster(tmp / "cluster", 0 if fault.startswith("no workers") else 2)
    log = tmp / "ran"
    guilty = GUILTY if fault.startswith("one item") else None
    n = 40 if guilty is not None else N
    item = make_item(log, guilty)
    store = str(tmp / "store")

    @durable_execution
    def handler(event, ctx):
        r = ctx.map(list(range(n)), lambda c, x, i, xs: item(x),
                    config=MapConfig(completion_config=CompletionConfig.all_completed()))
        return [it.result for it in r.all], r.failure_count

    started = time.monotonic()
    try:
        client = cluster.client(workers=len(cluster.workers))
        inject(fault, cluster, client, log)
        try:
            with dask.config.set({CLUSTER_WAIT_KEY: 10}):
                values, failed = handler.run(None, store=store, backend=client)
            outcome = "SUCCEEDED"
        except ClusterUnavailableError:
            with Store(store) as st:
                outcome = st.get_execution(handler.execution_id_for(None)).status
            values, failed = handler.run(None, store=store)  # resumed on the local pool
            outcome += ", resumed locally"
        client.close()
    finally:
        cluster.close()
    took = time.monotonic() - started
    ran = runs(log)
    expected = [None if x == guilty else x * 2 for x in range(n)]
    exact = values == expected
    return (f"{outcome}; exact {exact}; {failed} FAILED; {len(ran) - len(set(ran))} re-run; "
            f"{n - len(set(ran)) - (guilty is not None)} never ran; {took:.1f} s")


def plain_run(fault: str, tmp: Path) -> str:
    cluster = RealCluster(tmp / "cluster", 0 if fault.startswith("no workers") else 2)
    log = tmp / "ran"
    guilty = GUILTY if fault.startswith("one item") else None
    n = 40 if guilty is not None else N
    started = time.monotonic()
    try:
        client = cluster.client(workers=len(cluster.workers))
        futures = client.map(make_item(log, guilty), range(n), pure=False)
        inject(fault, cluster, client, log)
        values, errors = [], set()
        for future in futures:
            try:
                values.append(future.result(timeout=120))
            except Exception as exc:  # noqa: BLE001
                values.append(None)
                errors.add(type(exc).__name__)
        client.close()
    finally:
        cluster.close()
    took = time.monotonic() - started
    ran = runs(log)
    expected = [None if x == guilty else x * 2 for x in range(n)]
    return (f"exact {values == expected}; {sum(v is None for v in values)} errors {sorted(errors)}; "
            f"{len(ran) - len(set(ran))} re-run; {took:.1f} s")


FAULTS = ["one worker killed", "both workers killed", "one item kills its worker every try (40 items)",
          "scheduler killed", "no workers (one joins after 3 s)"]

if __name__ == "__main__":
    print(f"{N} items of {SECONDS:g} s, 2 workers x 1 thread, Dask default config, cluster-wait 10 s")
    print("| fault | durable_mp on Dask | plain client.map |\n|---|---|---|")
    for fault in [f for f in FAULTS if len(sys.argv) <= 3 or f in sys.argv[3].split(",")]:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            print(f"| {fault} | {durable_run(fault, Path(a))} | {plain_run(fault, Path(b))} |", flush=True)
