"""The dispatcher's decisions as pure functions: how many run, how big a chunk, what may queue ahead.

Nothing here touches a process, a pipe or a clock, so every rule is unit-tested on
plain numbers (``tests/engine/test_scheduling_decisions.py``).
"""

from __future__ import annotations

from durable_mp.engine.protocol import UNLIMITED, Budget

TARGET_CHUNK_SECONDS = 0.05  # a map chunk should keep a worker busy about this long
MAX_CHUNK_ITEMS = 4096
FIRST_CHUNK_ITEMS = 16  # before any item time is measured
PREFETCH_MIN_ITEMS = 64  # below this many queued map items, chunks go only to idle workers
CPU_BOUND_SHARE = 0.7  # parallel branches using at least this share of a core are prefetched
MIN_CHUNK_SECONDS = 0.002  # a chunk should not be shorter than this (the tail of a map)
CHUNKS_PER_WORKER = 4  # never put more than 1/(this * workers) of what is left in one chunk
GROWTH_CAP_PER_CPU = 8  # without explicit limits, the pool grows to at most this many workers per core


def concurrency_limit(explicit: int | None, max_workers: int | None, ncpu: int, io_waiting: int) -> tuple[int, int]:
    """(branches of the batch allowed to run now, workers the pool may grow to).

    An explicit ``max_concurrency`` is honoured as given.  Without one, CPU-bound work
    gets one branch per core, and every busy worker found waiting on I/O (little CPU,
    not runnable) lets one more start, up to ``GROWTH_CAP_PER_CPU`` per core.
    """
    cap = max_workers or (explicit if explicit else ncpu * GROWTH_CAP_PER_CPU)
    if explicit:
        return explicit, max(cap, 1)
    return ncpu + io_waiting, max(cap, 1)


def chunk_size(queued: int, allowed: int, item_seconds: float | None, *, is_map: bool, has_timeout: bool,
               first: int = FIRST_CHUNK_ITEMS, target: float = TARGET_CHUNK_SECONDS) -> int:
    """Items in the next chunk: one branch for parallel and for timed branches; map chunks sized by time.

    A chunk should keep a worker busy about ``TARGET_CHUNK_SECONDS`` (per-item cost far
    below a round trip) but never hold more than a 1/``CHUNKS_PER_WORKER`` share of what
    is left, so the tail spreads over every worker.  ``first`` bounds a chunk before any
    item time is known; ``target`` replaces ``TARGET_CHUNK_SECONDS`` where a chunk costs
    more than a pipe message (a Dask task: scheduler round trips).
    """
    if not is_map or has_timeout or queued <= 1:
        return min(1, queued)
    by_share = queued // (CHUNKS_PER_WORKER * max(allowed, 1))
    if item_seconds is None:
        size = max(1, min(by_share, first))
    else:
        item = max(item_seconds, 1e-7)
        by_time = int(target / item)
        at_least = int(MIN_CHUNK_SECONDS / item)
        size = max(1, min(by_time, max(by_share, at_least), MAX_CHUNK_ITEMS))
    return min(size, queued)


def start_budget(failures_to_stop: int | None, successes_to_stop: int | None, seen: tuple[int, int] = (0, 0)
                 ) -> Budget:
    """What a worker may see of a batch's outcomes before it must stop starting its items.

    The arguments are the policy's distance to a decision (``CompletionPolicy.stop_distance``)
    and how many (failures, successes) of this worker the driver had counted: a worker
    stops as soon as its own outcomes the driver had not counted would reach the
    distance, so within one worker no item starts after an outcome that completes the
    batch, whether its chunk was sent to an idle worker or queued ahead.
    """
    if failures_to_stop is None and successes_to_stop is None:
        return UNLIMITED
    return Budget(failures_to_stop, successes_to_stop, *seen)


def may_prefetch(*, is_map: bool, queued: int, cpu_share: float | None, has_timeout: bool) -> bool:
    """Queue the next chunk behind a busy worker, so the worker never waits for the driver?

    Only where waiting would not hurt: a map with plenty left to do, or parallel
    branches known to be CPU-bound (an I/O-bound branch queued behind a sleeping one
    would wait for nothing, where the pool would rather grow); never with per-branch
    deadlines (the deadline must start when the branch does).  A queued chunk carries a
    worker-relative budget (``start_budget``), so it never starts an item after an
    outcome of that worker that completes the batch.
    """
    if has_timeout:
        return False
    if is_map:
        return queued >= PREFETCH_MIN_ITEMS
    return cpu_share is not None and cpu_share >= CPU_BOUND_SHARE


def stop_chunk(budget: Budget, failures: int, successes: int) -> bool:
    """In the worker: stop starting items, given every outcome this worker produced for the batch?"""
    return ((budget.failures is not None and failures - budget.seen_failures >= budget.failures)
            or (budget.successes is not None and successes - budget.seen_successes >= budget.successes))


NEVER = 1 << 62  # a threshold no count reaches (an int: compared with ints, faster than math.inf)


def stop_thresholds(budget: Budget) -> tuple[int, int]:
    """``stop_chunk`` as thresholds: it stops once failures or successes reach these (``NEVER``: no limit).

    A worker's counts only grow, so the loop over a chunk compares two numbers per item
    instead of calling ``stop_chunk`` (a test checks the two agree).
    """
    failures = NEVER if budget.failures is None else budget.seen_failures + budget.failures
    successes = NEVER if budget.successes is None else budget.seen_successes + budget.successes
    return failures, successes


def started_by_the_decision(n: int, ended: int, max_concurrency: int | None) -> int:
    """How many items (the first ones, in index order) a batch had started when successes completed it.

    The reference starts items in index order while fewer than ``max_concurrency`` run
    (all at once without a cap) and refills a slot as soon as an item ends, until the
    decision: with ``ended`` items ended before the deciding one, it had started
    ``ended + max_concurrency`` of them.  Our pool may be smaller than that cap, so some of
    these never began in a worker; they are reported STARTED all the same, as the
    reference reports them (``map_with_min_successful``: ``total_count`` 10).
    """
    return n if max_concurrency is None else min(n, ended + max_concurrency)
