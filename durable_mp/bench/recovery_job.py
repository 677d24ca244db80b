"""The job the ``recovery`` scenario runs (and kills) in a subprocess.

``python -m durable_mp.bench.recovery_job STORE MARKERS EXECUTION_ID BRANCHES STEP_SECONDS WORKERS``

A parallel of BRANCHES branches, each one step that marks ``start-i``, sleeps, marks
``done-i``.  Prints the results as JSON when it finishes.
"""

from __future__ import annotations

import json
import sys
import time

from durable_mp import durable_execution
from durable_mp.bench.markers import mark
from durable_mp.config import ParallelConfig


def branch(markers: str, index: int, seconds: float):
    def run(ctx):
        def work(_):
            mark(markers, f"start-{index}")
            time.sleep(seconds)
            mark(markers, f"done-{index}")
            return index * index
        return ctx.step(work, name=f"work-{index}")
    return run


@durable_execution
def job(event: dict, context) -> list[int]:
    result = context.parallel(
        [branch(event["markers"], i, event["seconds"]) for i in range(event["branches"])],
        name="recovery", config=ParallelConfig(max_concurrency=event["concurrency"]))
    result.throw_if_error()
    return result.get_results()


def expected(branches: int) -> list[int]:
    return [i * i for i in range(branches)]


def main(argv: list[str]) -> int:
    store, markers, execution_id, branches, seconds, concurrency = argv
    event = {"markers": markers, "branches": int(branches), "seconds": float(seconds),
             "concurrency": int(concurrency)}
    out = job.run(event, store=store, execution_id=execution_id, progress=False)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
