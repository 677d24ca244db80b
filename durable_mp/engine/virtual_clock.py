"""The clock of a ``skip_time`` batch: idle time is skipped, the schedule is the real clock's.

Under ``skip_time`` a wait or retry delay returns at once, but the batch must run the
schedule the real clock gives (issue 18, defect 6): a branch sleeping keeps its
``max_concurrency`` slot, and its outcome comes when its sleep would have ended, after
the outcomes of branches that kept working meanwhile.  So a batch keeps virtual time:
real time plus the time skipped so far.  A branch's outcome *ends* at the virtual time
it arrived plus the seconds it slept; it is *held* (keeping its slot) until the virtual
time reaches that end.  While some branch is running, virtual time runs with the real
clock; when every branch is asleep, nothing can happen before the earliest end, so the
clock skips to it.  This is the reference runner's ``skip_time`` too: it skips time only
when the whole execution is suspended.

Both schedulers (the dispatcher's processes, a worker's threads) count one released
outcome at a time and start what the freed slot allows before the next, so a branch
starts when its slot frees.  When the batch completes, held outcomes are branches still
asleep then: a completion by successes reports them STARTED, one by failures lets them
finish.
"""

from __future__ import annotations

import heapq
import time
from typing import Any


class VirtualClock:
    """Held outcomes of one batch and the time it skipped (see the module docstring)."""

    __slots__ = ("skipped", "_held")

    def __init__(self) -> None:
        self.skipped = 0.0  # seconds the batch's virtual time is ahead of the real clock
        self._held: list[tuple[float, int, Any]] = []  # heap of (end, index, outcome)

    def __len__(self) -> int:
        """Branches held: each keeps its slot until it is released."""
        return len(self._held)

    def now(self) -> float:
        return time.monotonic() + self.skipped

    def hold(self, index: int, slept: float, outcome: Any) -> None:
        """Branch ``index`` just ended after sleeping ``slept`` seconds: its ``outcome`` waits for its end."""
        heapq.heappush(self._held, (self.now() + slept, index, outcome))

    def may_release(self, running: bool) -> bool:
        """Whether the earliest held outcome counts now (``running``: some branch of the batch runs)."""
        return bool(self._held) and (not running or self._held[0][0] <= self.now())

    def seconds_to_next(self) -> float | None:
        """Real seconds until the earliest held outcome ends while branches run (None: nothing held)."""
        return max(0.0, self._held[0][0] - self.now()) if self._held else None

    def release(self) -> tuple[int, Any]:
        """The earliest held outcome, ``(index, outcome)``; the clock skips to its end if that is ahead."""
        end, index, outcome = heapq.heappop(self._held)
        self.skipped += max(0.0, end - self.now())
        return index, outcome

    def still_sleeping(self) -> list[int]:
        """Held branches when the batch completed: they were asleep then (reported STARTED)."""
        indices = sorted(index for _, index, _ in self._held)
        self._held.clear()
        return indices
