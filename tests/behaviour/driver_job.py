"""A job whose driver a behaviour test SIGKILLs: ``python driver_job.py STORE MARKERS EXECUTOR``.

Six branches, two at a time, each one step that appends to the marker ``start-<i>``.
Steps 0 and 1 return at once; the others wait for the file ``MARKERS/../release`` (at
most 60 s), so the driver is killed with a later step running and 0 and 1 committed.
``EXECUTOR`` is a start method, or ``dask:<scheduler address>``.
"""

import os
import sys
import time

from durable_mp import durable_execution
from durable_mp.config import ParallelConfig

STORE, MARKERS, EXECUTOR = sys.argv[1:4]
RELEASE = os.path.join(os.path.dirname(MARKERS), "release")


def branch(i):
    def run(ctx):
        def work(step_ctx):
            with open(os.path.join(MARKERS, f"start-{i}"), "a") as f:
                f.write("x")
            deadline = time.monotonic() + 60
            while i >= 2 and not os.path.exists(RELEASE) and time.monotonic() < deadline:
                time.sleep(0.02)
            return i
        return ctx.step(work, name=f"work-{i}") * 3
    return run


def handler(event, ctx):
    return ctx.parallel([branch(i) for i in range(6)], name="job",
                        config=ParallelConfig(max_concurrency=2)).get_results()


if __name__ == "__main__":
    if EXECUTOR.startswith("dask:"):
        import distributed

        options = {"backend": distributed.Client(EXECUTOR[len("dask:"):], timeout=30)}
    else:
        options = {"start_method": EXECUTOR, "max_workers": 2}
    print(durable_execution(handler).run(None, store=STORE, execution_id="drv", **options), flush=True)
