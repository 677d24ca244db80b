"""Say at WARNING, as it happens, how the items of a batch fail: each distinct failure once.

A map whose items fail returns a ``BatchResult`` with failed items and the execution
still SUCCEEDS, so without this a bug in the map function is silent until someone reads
``failure_count``.  A failure is "distinct" by its type and the user's frame (file:line),
not by its message: ``ValueError: bad row 17`` and ``bad row 18`` are the same bug, and a
10 000-item map must not print 10 000 lines.  At the end, a batch whose every item failed
the same way says so plainly.
"""

from __future__ import annotations

import logging
from typing import Any

from durable_mp.core.remote import Frame, user_frame
from durable_mp.core.spec import BatchSpec

log = logging.getLogger("durable_mp.failures")

# Distinct failures listed by name in the closing line; more are counted, not named.
SUMMARY_KINDS = 3


class FailureLog:
    """Failures of one running batch, keyed by (error type, user frame)."""

    __slots__ = ("name", "total", "noun", "nouns", "failed", "kinds")

    def __init__(self, name: str, total: int, noun: str = "item") -> None:
        self.name = name
        self.total = total
        self.noun = noun  # "item" of a map, "branch" of a parallel
        self.nouns = "branches" if noun == "branch" else noun + "s"
        self.failed = 0
        self.kinds: dict[tuple[str, str | None], list[Any]] = {}  # key -> [count, message, frame]

    @classmethod
    def of(cls, spec: BatchSpec) -> FailureLog:
        """The log of one batch, named as the user knows it: its name, else its map function's."""
        func_name = getattr(spec.func, "__name__", None) if spec.func is not None else None
        name = spec.name or (func_name if func_name and func_name != "<lambda>" else spec.sub_type)
        return cls(name, spec.n, "item" if spec.funcs is None else "branch")

    def note(self, index: int, error: dict[str, Any] | None) -> None:
        """One failed item; the first of its kind is logged at WARNING with its type, message and frame."""
        self.failed += 1
        error = error or {}
        kind = str(error.get("ErrorType") or "Error")
        message = str(error.get("ErrorMessage") or "")
        frame = user_frame(error.get("StackTrace"))
        key = (kind, str(frame) if frame is not None else None)
        seen = self.kinds.get(key)
        if seen is not None:
            seen[0] += 1
            return
        self.kinds[key] = [1, message, frame]
        log.warning("%s: %s %d failed: %s%s (further %s failing this way are not logged one by one)",
                    self.name, self.noun, index, _one_line(kind, message), _at(frame), self.nouns)

    def close(self, succeeded: int) -> None:
        """The closing line: how many items failed, and how; plain words when all that ran failed alike.

        ``succeeded`` counts the batch's successful items (replayed ones included).  A single
        failure was said in full as it happened.
        """
        if self.failed < 2:
            return
        if len(self.kinds) == 1 and not succeeded:
            (kind, _), (count, message, frame) = next(iter(self.kinds.items()))
            if self.failed == self.total:
                head = f"all {self.total} {self.nouns} of {self.name!r} failed the same way"
            else:
                head = (f"every {self.noun} of {self.name!r} that ran failed the same way ({self.failed} of "
                        f"{self.total}; the batch stopped starting {self.nouns})")
            log.warning("%s: %s%s; the function itself is probably at fault, not the data",
                        head, _one_line(kind, message), _at(frame))
            return
        ranked = sorted(self.kinds.items(), key=lambda kv: -kv[1][0])
        named = [f"{count}x {kind}{_at(frame)}" for (kind, _), (count, _, frame) in ranked[:SUMMARY_KINDS]]
        more = len(ranked) - SUMMARY_KINDS
        if more > 0:
            named.append(f"{more} more kind(s)")
        log.warning("%s: %d of %d %s failed (%s)", self.name, self.failed, self.total, self.nouns, "; ".join(named))


class NullFailureLog:
    """No batch running."""

    def note(self, index: int, error: dict[str, Any] | None) -> None:
        pass

    def close(self, succeeded: int) -> None:
        pass


NULL_FAILURE_LOG = NullFailureLog()


def _one_line(kind: str, message: str) -> str:
    text = " ".join(message.split())
    return f"{kind}: {text}" if text else kind


def _at(frame: Frame | None) -> str:
    return f" at {frame}" if frame is not None else ""


__all__ = ["NULL_FAILURE_LOG", "FailureLog", "NullFailureLog"]
