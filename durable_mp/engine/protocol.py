"""Every message between the driver and a worker: one typed record per kind of message.

Messages are small ``NamedTuple`` records (they pickle as tuples plus a class
reference); their class is their kind, and a receiver dispatches on it with ``match``
(``case Records(): ...``).  Requests a worker waits
on carry a ``request_id`` and the driver's ``Reply`` names it, so nothing is matched
by position: a chunk queued ahead in the pipe can never be taken for a reply.

Every worker → driver message carries ``seq``, numbered 1, 2, ... per worker in the
order the worker sent it (``worker.Channel`` stamps it as it writes the message).  The
driver applies them in that order and refuses a gap or a reordering (``Sequence``):
records of one operation overwrite each other in the store, so their order is their
meaning.  The worker's ``Outbox`` takes its waiting records and sends them under one
lock, so records leave in the order they were produced.

============== ========= ==========================================================
message        direction meaning
============== ========= ==========================================================
RunChunk       D → W     run branches ``indices`` of batch ``token`` (payload the first
                         time this worker sees the token), within ``budget``
RunCall        D → W     one attempt of a driver-level step that has a timeout
StopBatch      D → W     start no more branches of batch ``token`` (failure-triggered
                         completion); branches already running finish
Reply          D → W     the answer to request ``request_id``
Quit           D → W     exit when idle
Records        W → D     finished records: nested operations and branch outcomes (plain
                         successes as columns: ``Succeeded``)
ChunkDone      W → D     the chunk ended; which of its indices never started; CPU share, seconds
SyncRequest    W → D     commit these records, then reply (AT_MOST_ONCE START)
CallbackWait   W → D     reply when callback ``record`` is completed or timed out
WatchStart     W → D     a step with a timeout (or memory watch) starts: ``watch_id``
WatchEnd       W → D     that step's attempt ended
Log            W → D     a log record to re-emit through the driver's handlers
CallResult     W → D     outcome of a ``RunCall``
============== ========= ==========================================================

::

    driver                                   worker (reader thread │ main thread)
      │── RunChunk(task 7, [0..15]) ────────▶│ queue ─────────────▶ run 0, 1, ...
      │── RunChunk(task 8, [16..31]) ───────▶│ queue (prefetched)
      │◀─ Records(task 7, ...) ──────────────│                      (every few ms)
      │◀─ SyncRequest(req 3, task 7, ...) ───│                      step START, waits
      │   commit                             │
      │── Reply(req 3) ─────────────────────▶│ wakes request 3 ──▶ step body runs
      │◀─ ChunkDone(task 7, unstarted=[]) ───│                      task 8 starts
"""

from __future__ import annotations

from typing import Any, NamedTuple

from durable_mp.core.errors import InvariantError

# A record as it travels: (parent_id, op_id, record bytes or wire.Gather) for nested
# operations; (index, succeeded, key, record bytes or wire.Gather) for branch outcomes.
Nested = list[tuple[str, str, Any]]
Items = list[tuple[int, bool, str, Any]]

# In ``Succeeded.values``: the value was not sent, decode it from its record.
NOT_SENT: Any = Ellipsis


class Succeeded(NamedTuple):
    """Branches that succeeded plainly, as columns: the hot path of a map over small items.

    ``records[i]`` is the compact record (``core.records.item_record``) of branch
    ``indices[i]``; ``values[i]`` its value when that is an immutable scalar (so the
    driver need not decode it), else ``NOT_SENT``.  Three lists pickle in a few C calls,
    where a tuple per branch costs a pickler round each.
    """

    indices: list[int]
    records: list[bytes]
    values: list[Any]


class Budget(NamedTuple):
    """How many more failures / successes a worker may see of a batch before it stops starting its items.

    ``None`` means no limit.  The driver derives it from the completion policy at
    dispatch (``scheduling.start_budget``).  ``seen_failures`` / ``seen_successes`` are
    how many outcomes *of this worker* the driver had counted then: the worker counts
    every outcome it produced for the batch, and those the driver had not seen spend
    the budget.  So a worker never starts an item that the policy, applied to every
    outcome known in that worker, would not start, even in a chunk queued ahead.
    """

    failures: int | None
    successes: int | None
    seen_failures: int = 0
    seen_successes: int = 0


UNLIMITED = Budget(None, None)


class RunChunk(NamedTuple):
    task_id: int
    token: str
    payload: Any  # wire.Gather of the batch payload, or None when the worker has it cached
    indices: list[int]
    names: dict[int, str] | None
    checkpoints: dict[int, dict[str, Any]] | None
    budget: Budget


class RunCall(NamedTuple):
    task_id: int
    payload: bytes


class StopBatch(NamedTuple):
    token: str


class Reply(NamedTuple):
    request_id: int
    value: Any = None


class Quit(NamedTuple):
    """Exit when idle."""


class Records(NamedTuple):
    task_id: int
    nested: Nested
    items: Items
    succeeded: Succeeded | None = None
    seq: int = 0  # on every worker → driver message: its number in the worker's send order


class ChunkDone(NamedTuple):
    task_id: int
    nested: Nested
    items: Items
    unstarted: list[int]
    cpu_share: float
    succeeded: Succeeded | None = None
    seconds: float = 0.0  # the chunk's wall time in the worker: its items' cost without the round trip
    seq: int = 0


class SyncRequest(NamedTuple):
    request_id: int
    task_id: int
    nested: Nested
    items: Items
    succeeded: Succeeded | None = None
    seq: int = 0


class CallbackWait(NamedTuple):
    request_id: int
    task_id: int
    record: Any  # core.records.OpRecord of the CALLBACK operation
    seq: int = 0


class WatchStart(NamedTuple):
    task_id: int
    watch_id: int
    record: Any  # the step's STARTED OpRecord
    timeout: float | None
    seq: int = 0


class WatchEnd(NamedTuple):
    task_id: int
    watch_id: int
    seq: int = 0


class Log(NamedTuple):
    data: dict[str, Any]
    seq: int = 0


class CallResult(NamedTuple):
    task_id: int
    ok: bool
    value: Any  # pickled result; or the exception (pickled, or (ErrorObject dict, class name))
    seq: int = 0


class ProtocolError(InvariantError):
    """A worker's messages arrived out of order or with a gap: applying them could undo a newer record."""


class Sequence:
    """The driver's check of one worker's message numbers: 1, 2, 3, ... with no gap and no reordering."""

    __slots__ = ("last", "who")

    def __init__(self, who: str) -> None:
        self.last = 0
        self.who = who

    def check(self, message: Any) -> Any:
        """``message`` if it is the next one; ``ProtocolError`` otherwise (never applied)."""
        seq = message.seq
        if seq != self.last + 1:
            raise ProtocolError(f"{self.who}: message {type(message).__name__} numbered {seq} arrived after "
                                f"{self.last}; worker messages must arrive in order, without gaps")
        self.last = seq
        return message
