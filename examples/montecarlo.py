"""A CPU-heavy fan-out that survives a crashing worker and a killed driver.

    python examples/montecarlo.py             # 64 branches of pure-Python work on every core
    python examples/montecarlo.py --crash     # branch 7 segfaults its worker once: only it re-runs
    (Ctrl-C or kill -9 it midway, then run the same command again: it resumes)

Progress bars show on a terminal. The execution id is montecarlo-pi-<branches>:

    python -m durable_mp show montecarlo-pi-64    # afterwards: the operation tree
"""

import argparse
import ctypes
import os
import random
import sys

from durable_mp import DurableContext, durable_execution
from durable_mp.config import MapConfig

SAMPLES = 400_000


def estimate(ctx: DurableContext, seed: int, index: int, seeds: list) -> int:
    """Points of SAMPLES random ones that fall inside the unit circle (pure Python, ~0.3 s)."""
    marker = os.path.join(os.environ.get("MONTECARLO_MARKERS", "."), f".crashed-{seed}")
    if os.environ.get("MONTECARLO_CRASH") and index == 7 and not os.path.exists(marker):
        open(marker, "w").close()
        ctypes.string_at(0)  # a real segfault: the worker dies, the driver re-dispatches this branch
    rng = random.Random(seed)
    return sum(1 for _ in range(SAMPLES) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)


@durable_execution
def handler(event: dict, context: DurableContext) -> float:
    seeds = list(range(event["branches"]))
    hits = context.map(seeds, estimate, name="samples", config=MapConfig(max_concurrency=os.cpu_count()))
    hits.throw_if_error()
    return 4.0 * sum(hits.get_results()) / (SAMPLES * len(seeds))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--branches", type=int, default=64)
    parser.add_argument("--crash", action="store_true", help="segfault one worker once")
    args = parser.parse_args()
    if args.crash:
        os.environ["MONTECARLO_CRASH"] = "1"
    pi = handler.run({"branches": args.branches}, execution_id=f"montecarlo-pi-{args.branches}")
    print(f"pi ~= {pi:.5f}")
    sys.exit(0)
