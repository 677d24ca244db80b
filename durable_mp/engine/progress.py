"""Progress of running parallel/map calls: a tqdm bar on a terminal, nothing otherwise.

The dispatcher calls ``bar.item(ok)`` once per finished branch; the null bar makes that a
no-op method call, and the tqdm bar only redraws at tqdm's own rate, so progress never
shows up on the hot path.
"""

from __future__ import annotations

import sys
from typing import Any


class NullBar:
    def item(self, succeeded: bool) -> None:
        pass

    def close(self) -> None:
        pass


NULL_BAR = NullBar()


class NullProgress:
    def start(self, name: str, total: int, done: int = 0) -> NullBar:
        return NULL_BAR


class TqdmBar:
    """One bar per batch: done / failed counts, rate and ETA."""

    def __init__(self, name: str, total: int, done: int, stream: Any) -> None:
        from tqdm import tqdm

        self.failed = 0
        self.bar = tqdm(total=total, initial=done, desc=name, file=stream, unit="br", leave=True,
                        dynamic_ncols=True, mininterval=0.2)

    def item(self, succeeded: bool) -> None:
        if not succeeded:
            self.failed += 1
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class TqdmProgress:
    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr

    def start(self, name: str, total: int, done: int = 0) -> Any:
        try:
            return TqdmBar(name, total, done, self.stream)
        except ImportError:
            return NULL_BAR


def choose(progress: bool | None) -> Any:
    """``True``: always; ``False``: never; ``None``: when stderr is a terminal."""
    if progress is None:
        progress = sys.stderr.isatty()
    return TqdmProgress() if progress else NullProgress()
