"""Branches waiting for a callback, each answered once the store says it is done.

A callback inside a branch is completed from outside (API, CLI, the testing runner) by a
compare-and-set on its record in the store; the branch's worker waits for the driver to
tell it.  Both dispatchers keep their waiters here: a local worker waits by request id,
a Dask task by reply variable.  Who waits (``key``), whether it is still there
(``alive``) and how it is answered (``answer``) are the dispatcher's; the polling is this.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from durable_mp.core.records import OpRecord

PollCallback = Callable[[Any, str, OpRecord], OpRecord | None]  # (store, execution id, record) -> done record


class CallbackWaits:
    """``{key: the callback's record}`` of every branch waiting; ``poll`` answers the finished ones."""

    __slots__ = ("store", "execution_id", "poll_callback", "alive", "answer", "waiting")

    def __init__(self, store: Any, execution_id: str, poll_callback: PollCallback | None,
                 alive: Callable[[Any], bool], answer: Callable[[Any, OpRecord], None]) -> None:
        self.store = store
        self.execution_id = execution_id
        self.poll_callback = poll_callback
        self.alive = alive
        self.answer = answer
        self.waiting: dict[Hashable, OpRecord] = {}

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def add(self, key: Hashable, record: OpRecord) -> None:
        """A branch began waiting for the callback of ``record``: answer at once if it is done."""
        self.waiting[key] = record
        self.poll()

    def prune(self) -> None:
        """Forget the waiters that are gone (their worker or task ended)."""
        self.waiting = {key: rec for key, rec in self.waiting.items() if self.alive(key)}

    def poll(self) -> None:
        """Read each awaited callback in the store; answer those that are done."""
        for key, rec in list(self.waiting.items()):
            if not self.alive(key):
                del self.waiting[key]
                continue
            assert self.poll_callback is not None, "a dispatcher that runs callbacks needs poll_callback"
            done = self.poll_callback(self.store, self.execution_id, rec)
            if done is not None:
                del self.waiting[key]
                self.answer(key, done)
