"""Bench work run in workers, in a module that imports nothing of durable_mp.

A worker unpickles a module-level function by importing its module; the first-branch
measurements (``start``) must time the start of the pool, not the import of the bench's
scenarios.  ProcessPoolExecutor's first task is taken from here too, so both sides pay
the same import.
"""

from __future__ import annotations

import time


def stamp_item(ctx, x: int, index: int, inputs: list) -> float:
    """A map item whose first act is to note when it started (wall clock, one for every process on Linux)."""
    return time.time()


def stamp() -> float:
    """The same for a ProcessPoolExecutor task."""
    return time.time()
