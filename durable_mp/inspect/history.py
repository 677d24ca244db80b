"""The event history of an execution, in the reference's event model, derived from its records.

durable_mp stores one checkpoint per operation (its latest state plus the list of its
attempts), not a log of events.  The events the reference service would have written
follow from those records, with the fields and ``*Details`` objects the reference's
``GetDurableExecutionHistory`` returns (``tests/data/reference_history`` holds recorded
ones; ``tests/inspect/test_history_reference.py`` compares):

* the execution: ``ExecutionStarted`` (``Input``) ... ``ExecutionSucceeded`` (``Result``)
  or ``ExecutionFailed`` (``Error``);
* a context (``Parallel``, ``Map``, ``ParallelBranch``, ``MapIteration``,
  ``RunInChildContext``, ``WaitForCallback``): ``ContextStarted`` then
  ``ContextSucceeded`` (``Result``; a batch's is its ``BatchResult``) or ``ContextFailed``;
* a step: per attempt ``StepStarted`` then ``StepSucceeded`` (``Result``) or ``StepFailed``
  (``Error``, ``RetryDetails``); ``WaitForCondition`` checks likewise, a check that goes
  on polling carrying ``RetryDetails``;
* a wait: ``WaitStarted`` (``Duration``, ``ScheduledEndTimestamp``) and ``WaitSucceeded``;
* a callback: ``CallbackStarted`` (``CallbackId``, ``Timeout``/``HeartbeatTimeout`` when
  set) then ``CallbackSucceeded``, ``CallbackFailed`` or ``CallbackTimedOut``;
* ``InvocationCompleted`` closes each driver run (a run is one invocation); a run whose
  driver stopped before the execution ended carries an ``Error``;
* ``WorkerCrashed`` (durable_mp's own; the reference has no worker processes) marks each
  worker that died under a branch or step, with its pid.

Payloads are the reference's: what its default serializer makes of the stored value
(``Truncated`` with no ``Payload`` when the value has no JSON form or is too large).
Events are numbered 1.. in timestamp order, with the tree deciding ties and clock jitter
between processes: a parent's start comes before anything inside it and its end after.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import heapq
import json
import pickle
from dataclasses import dataclass, field
from typing import Any, Protocol

from durable_mp.core.callback_ids import encode_callback_id
from durable_mp.core.records import Attempt, OpRecord, OpStatus, OpType
from durable_mp.core.vocabulary import SubType
from durable_mp.inspect.runs import CRASH_TYPE, DEATH_TYPES, crash_facts
from durable_mp.inspect.tree import OpTree, error_line, error_type, is_batch, is_branch
from durable_mp.store.records import FAILED, SUCCEEDED, ExecutionRecord

MAX_PAYLOAD_CHARS = 256 * 1024  # the reference's checkpoint limit; larger payloads are marked Truncated
MAX_BATCH_PAYLOAD_ITEMS = 10_000  # a bigger batch's BatchResult is not rebuilt for the history
STOPPED_RUN = "DriverStopped"  # error type of an invocation whose driver ended before the execution
WORKER_CRASHED_EVENT = "WorkerCrashed"
_NO_VALUE = object()


class PayloadCodec(Protocol):
    """How stored payloads become the reference's payload text.

    ``inspect`` uses only ``core`` and ``store`` (docs/architecture.md "Packages"), so the reference's
    serializer and ``BatchResult`` come in from outside: ``durable_mp.history_payloads``
    (the CLI and the test runner pass it).  Every method raises when it cannot.
    """

    def value(self, data: bytes | str) -> Any:
        """The value a stored payload holds."""

    def encode(self, value: Any) -> str:
        """The reference's default serializer's text for ``value``."""

    def batch_result(self, items: list[tuple[int, str, Any, dict | None]], reason: str) -> Any:
        """A ``BatchResult`` of ``(index, status, value, error)`` items."""


class StoredPayloads:
    """Without the serializers: stored text is shown as is, pickles are loaded, nothing re-encoded."""

    def value(self, data: bytes | str) -> Any:
        if isinstance(data, str):
            raise ValueError("text payloads are shown as stored")
        return pickle.loads(data)

    def encode(self, value: Any) -> str:
        raise NotImplementedError("no serializer given (durable_mp.history_payloads.HistoryPayloads)")

    def batch_result(self, items: list[tuple[int, str, Any, dict | None]], reason: str) -> Any:
        raise NotImplementedError("no BatchResult given (durable_mp.history_payloads.HistoryPayloads)")


def iso(ts: float | None) -> str | None:
    """ISO-8601 UTC with milliseconds, the reference's ``EventTimestamp`` format."""
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Event:
    """One history event; ``to_dict`` gives the reference's field names."""

    event_type: str
    timestamp: float
    op_id: str  # "" for an invocation (it belongs to no operation)
    name: str | None
    sub_type: str | None = None
    parent_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    event_id: int = 0
    depth: int = 0
    note: str = ""  # a short human summary for the table (not part of the JSON)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"EventType": self.event_type, "EventTimestamp": iso(self.timestamp),
                               "EventId": self.event_id}
        if self.sub_type is not None:
            out["SubType"] = self.sub_type
        if self.op_id:
            out["Id"] = self.op_id
        if self.name is not None:
            out["Name"] = self.name
        if self.parent_id:
            out["ParentId"] = self.parent_id
        out[f"{self.event_type}Details"] = self.details
        return out


def _error(error: dict | None) -> dict:
    return {"Truncated": False, "Payload": dict(error or {})}


def _text_payload(text: str | None) -> dict:
    if text is None:
        return {"Truncated": False}
    if len(text) > MAX_PAYLOAD_CHARS:
        return {"Truncated": True}
    return {"Truncated": False, "Payload": text}


def _value(codec: PayloadCodec, data: bytes | str | None) -> Any:
    """The stored value of a result, or ``_NO_VALUE`` if it cannot be loaded here."""
    if data is None:
        return None
    try:
        return codec.value(data)
    except Exception:  # noqa: BLE001 - another serdes' text, or classes this process cannot import
        return _NO_VALUE


def _encoded(codec: PayloadCodec, value: Any) -> str | None:
    """The reference's default serializer's text for ``value``, or None if it has none."""
    if value is _NO_VALUE:
        return None
    try:
        return codec.encode(value)
    except Exception:  # noqa: BLE001 - no JSON form (arrays, arbitrary objects): no payload
        return None


def _result(codec: PayloadCodec, rec: OpRecord) -> dict:
    """``{"Truncated", "Payload"}`` for an operation's stored result."""
    data = rec.result
    if isinstance(data, str):
        if rec.op_type == OpType.CONTEXT and rec.sub_type == SubType.WAIT_FOR_CALLBACK and (rec.extra or {}).get("raw"):
            text = _encoded(codec, data)  # the callback's text, serialized as the reference does
            return {"Truncated": True} if text is None else _text_payload(text)
        return _text_payload(data)  # already the reference's envelope (or a JSON serdes' / a callback's text)
    if data is None:
        return _text_payload(None)
    if isinstance(data, bytes | bytearray | memoryview) and len(data) > MAX_PAYLOAD_CHARS * 4:
        return {"Truncated": True}
    text = _encoded(codec, _value(codec, data))
    return {"Truncated": True} if text is None else _text_payload(text)


def _batch_result(codec: PayloadCodec, tree: OpTree, rec: OpRecord) -> dict:
    """A finished batch's ``BatchResult`` as the reference serializes it, rebuilt from its branches."""
    branches = [c for c in tree.children(rec.op_id) if is_branch(c)]
    reason = (rec.extra or {}).get("completion_reason")
    if rec.result is not None or reason is None or len(branches) > MAX_BATCH_PAYLOAD_ITEMS:
        # a batch with a configured serdes checkpointed its BatchResult as that serdes encoded it
        return _result(codec, rec)
    items: list[tuple[int, str, Any, dict | None]] = []
    for c in branches:
        index = tree.index.get(c.op_id, len(items))
        if c.status == OpStatus.SUCCEEDED:
            value = _value(codec, c.result)
            if value is _NO_VALUE:
                return {"Truncated": True}
            items.append((index, OpStatus.SUCCEEDED, value, None))
        elif c.status == OpStatus.FAILED:
            items.append((index, OpStatus.FAILED, None, c.error or {}))
        else:
            items.append((index, OpStatus.STARTED, None, None))
    try:
        batch = codec.batch_result(items, reason)
    except Exception:  # noqa: BLE001 - no BatchResult here, or a reason it does not know
        return _result(codec, rec)
    text = _encoded(codec, batch)
    return {"Truncated": True} if text is None else _text_payload(text)


def _execution_payload(codec: PayloadCodec, data: bytes | None) -> dict:
    """The execution's input/result as JSON text (the reference JSON-encodes both)."""
    if data is None:
        return {"Truncated": False}
    value = _value(codec, data)
    if value is _NO_VALUE:
        return {"Truncated": True}
    try:
        return _text_payload(json.dumps(value))
    except (TypeError, ValueError):
        return {"Truncated": True}


def _seconds(value: float) -> int:
    return max(0, int(round(value)))


def _retry(current: int, delay: float | None) -> dict:
    return {"CurrentAttempt": current, "NextAttemptDelaySeconds": _seconds(delay or 0.0)}


def _step_events(codec: PayloadCodec, rec: OpRecord, ev) -> list[Event]:
    """StepStarted / StepFailed(+retry) ... per attempt, ending with the terminal event."""
    out: list[Event] = []
    attempts = list(rec.attempts)
    polling = rec.sub_type == SubType.WAIT_FOR_CONDITION
    for i, att in enumerate(attempts):
        out.append(ev("StepStarted", att.start_ts, {}))
        last = i == len(attempts) - 1
        end = att.end_ts if att.end_ts is not None else att.start_ts
        if last and rec.is_terminal and (att.error is None) == (rec.status == OpStatus.SUCCEEDED):
            break  # the terminal event below
        if att.retry_delay is not None:
            delay: float | None = att.retry_delay
        elif not last:
            delay = attempts[i + 1].start_ts - end
        else:
            delay = (rec.next_attempt_ts - end) if rec.next_attempt_ts is not None else None
        if att.error is None:  # a condition check that keeps polling (or an older retried success)
            out.append(ev("StepSucceeded", end, {"Result": {"Truncated": False},
                                                 "RetryDetails": _retry(att.number, delay)}))
            continue
        out.append(ev("StepFailed", end, {"Error": _error(att.error), "RetryDetails": _retry(att.number, delay)},
                      error_line(att.error, 120)))
        if error_type(att.error) == CRASH_TYPE:  # the step ran in a worker that died
            out.append(_crash_event(att, ev))
    if rec.status == OpStatus.STARTED and rec.attempt > len(attempts):
        # the running attempt (only checkpointed for at-most-once steps)
        out.append(ev("StepStarted", attempts[-1].end_ts if attempts and attempts[-1].end_ts else rec.start_ts, {}))
    if not attempts and rec.is_terminal:
        out.append(ev("StepStarted", rec.start_ts, {}))
    end = rec.end_ts if rec.end_ts is not None else rec.start_ts
    if rec.status == OpStatus.SUCCEEDED:
        out.append(ev("StepSucceeded", end, {"Result": _result(codec, rec)},
                      f"attempt {rec.attempt}" if rec.attempt > 1 and not polling else ""))
    elif rec.status == OpStatus.FAILED:
        out.append(ev("StepFailed", end, {"Error": _error(rec.error), "RetryDetails": _retry(max(rec.attempt, 1), 0)},
                      error_line(rec.error, 120)))
    return out


def _callback_events(codec: PayloadCodec, rec: OpRecord, execution_id: str, ev) -> tuple[list[Event], list[Event]]:
    extra = rec.extra or {}
    started: dict[str, Any] = {"CallbackId": encode_callback_id(execution_id, rec.parent_id, rec.op_id)}
    if extra.get("deadline"):
        started["Timeout"] = _seconds(extra["deadline"] - rec.start_ts)
    if extra.get("heartbeat_timeout"):
        started["HeartbeatTimeout"] = _seconds(extra["heartbeat_timeout"])
    end = rec.end_ts if rec.end_ts is not None else rec.start_ts
    after: list[Event] = []
    if rec.status == OpStatus.SUCCEEDED:
        after = [ev("CallbackSucceeded", end, {"Result": _result(codec, rec)})]
    elif rec.status == OpStatus.TIMED_OUT:
        after = [ev("CallbackTimedOut", end, {"Error": _error(rec.error)}, error_line(rec.error, 120))]
    elif rec.status == OpStatus.FAILED:
        after = [ev("CallbackFailed", end, {"Error": _error(rec.error)}, error_line(rec.error, 120))]
    return [ev("CallbackStarted", rec.start_ts, started, f"callback id {started['CallbackId']}")], after


def _crash_event(att: Attempt, ev) -> Event:
    return ev(WORKER_CRASHED_EVENT, att.end_ts or att.start_ts,
              {"Pid": att.pid, "Attempt": att.number, "Error": _error(att.error)},
              f"worker pid {att.pid}: {error_line(att.error, 100)}")


def _crash_events(rec: OpRecord, ev) -> list[Event]:
    """``WorkerCrashed`` for each worker that died (or was killed) while running this branch."""
    out = [_crash_event(att, ev) for att in rec.attempts if error_type(att.error) in DEATH_TYPES]
    if not out and error_type(rec.error) in DEATH_TYPES:  # older records: only the final error
        out.append(ev(WORKER_CRASHED_EVENT, rec.end_ts or rec.start_ts,
                      {"Pid": rec.pid, "Attempt": rec.attempt, "Error": _error(rec.error)},
                      error_line(rec.error, 100)))
    return out


def _own_events(codec: PayloadCodec, tree: OpTree, rec: OpRecord, depth: int) -> tuple[list[Event], list[Event]]:
    """(events before the children of ``rec``, events after them)."""
    parent = rec.parent_id or None

    def ev(kind: str, ts: float, details: dict, note: str = "") -> Event:
        return Event(kind, ts, rec.op_id, rec.name, rec.sub_type, parent, details, depth=depth, note=note)

    end = rec.end_ts if rec.end_ts is not None else rec.start_ts
    if tree.is_virtual(rec):  # a FLAT branch records no events of its own; its worker deaths are still told
        return _crash_events(rec, ev), []
    if rec.op_type == OpType.STEP:
        return _step_events(codec, rec, ev), []
    if rec.op_type == OpType.CALLBACK:
        return _callback_events(codec, rec, tree.execution.exec_id, ev)
    if rec.op_type == OpType.WAIT:
        extra = rec.extra or {}
        started: dict[str, Any] = {}
        if extra.get("scheduled_end") is not None:
            started = {"Duration": _seconds(extra["scheduled_end"] - rec.start_ts),
                       "ScheduledEndTimestamp": iso(extra["scheduled_end"])}
        after = [ev("WaitSucceeded", end, {"Duration": started.get("Duration")})] \
            if rec.status == OpStatus.SUCCEEDED else []
        return [ev("WaitStarted", rec.start_ts, started, f"{started.get('Duration')}s" if started else "")], after
    kind = "Context" if rec.op_type == OpType.CONTEXT else rec.op_type.title()
    first = min([rec.start_ts] + [a.start_ts for a in rec.attempts])
    before = [ev(f"{kind}Started", first, {})]
    if is_branch(rec):
        before += _crash_events(rec, ev)
    after = []
    if rec.status == OpStatus.SUCCEEDED:
        result = _batch_result(codec, tree, rec) if is_batch(rec) else _result(codec, rec)
        after = [ev(f"{kind}Succeeded", end, {"Result": result}, (rec.extra or {}).get("completion_reason", ""))]
    elif rec.status == OpStatus.FAILED:
        after = [ev(f"{kind}Failed", end, {"Error": _error(rec.error)}, error_line(rec.error, 120))]
    return before, after


def _monotone(events: list[Event], floor: float) -> list[tuple[float, Event]]:
    """Pair events with non-decreasing sort keys (never before ``floor``)."""
    out = []
    key = floor
    for e in events:
        key = max(key, e.timestamp)
        out.append((key, e))
    return out


def _subtree(codec: PayloadCodec, tree: OpTree, rec: OpRecord, depth: int,
             floor: float) -> list[tuple[float, Event]]:
    before, after = _own_events(codec, tree, rec, depth)
    head = _monotone(before, floor)
    start_key = head[0][0] if head else max(floor, rec.start_ts)
    body = _merge([_subtree(codec, tree, child, depth + 1, start_key) for child in tree.children(rec.op_id)])
    if len(head) > 1:  # crash events interleave with the children by time, after the start
        body = _merge([head[1:], body])
        head = head[:1]
    inner_end = body[-1][0] if body else start_key
    return head + body + _monotone(after, inner_end)


def _merge(streams: list[list[tuple[float, Event]]]) -> list[tuple[float, Event]]:
    """Merge by key; equal keys keep stream order (earlier-started sibling first)."""
    tagged = [[(key, n, i, e) for i, (key, e) in enumerate(s)] for n, s in enumerate(streams)]
    return [(key, e) for key, _n, _i, e in heapq.merge(*tagged)]


def _invocations(tree: OpTree) -> list[Event]:
    """One ``InvocationCompleted`` per driver run that is over."""
    out = []
    for run in crash_facts(tree).runs:
        if run.running:
            continue
        details: dict[str, Any] = {"StartTimestamp": iso(run.start), "EndTimestamp": iso(run.end),
                                   "RequestId": f"run-{run.number}"}
        note = f"run {run.number}" + (": the execution failed; a later run resumed it" if run.failed else "")
        if not run.finished:
            message = (f"the driver of run {run.number} stopped (killed or interrupted) before the execution "
                       f"finished; its last record was written at {iso(run.end)}")
            details["Error"] = {"ErrorType": STOPPED_RUN, "ErrorMessage": message}
            note += f": {STOPPED_RUN}"
        out.append(Event("InvocationCompleted", run.end, "", None, details=details, note=note))
    return out


def build_history(execution: ExecutionRecord, ops: list[OpRecord],
                  codec: PayloadCodec | None = None) -> list[Event]:
    """All events of ``execution`` in order, ``event_id`` from 1.

    ``codec`` (``durable_mp.history_payloads.HistoryPayloads()``) gives payloads in the
    reference's encoding where the store holds pickles; without it they are as stored.
    """
    codec = codec or StoredPayloads()
    tree = OpTree(execution, ops)
    ex = execution
    started = Event("ExecutionStarted", ex.created_ts, ex.exec_id, ex.exec_id, None, None,
                    {"Input": _execution_payload(codec, ex.input)}, note=ex.handler)
    body = _merge([_subtree(codec, tree, rec, 0, ex.created_ts) for rec in tree.children("")])
    keys = [key for key, _e in body]
    events = [started] + [e for _key, e in body]
    # an invocation ends after everything it recorded: insert each by its end time
    invocations = _invocations(tree)
    last = invocations[-1] if invocations else None
    for inv in reversed(invocations):
        stopped = inv is not last  # only the last run's invocation closes everything recorded
        events.insert(1 + (bisect.bisect_right(keys, inv.timestamp) if stopped else len(keys)), inv)
    end = max([ex.ended_ts or ex.created_ts] + [e.timestamp for e in events])
    if ex.status == SUCCEEDED:
        events.append(Event("ExecutionSucceeded", ex.ended_ts or end, ex.exec_id, ex.exec_id, None, None,
                            {"Result": _execution_payload(codec, ex.result)}))
    elif ex.status == FAILED:
        events.append(Event("ExecutionFailed", ex.ended_ts or end, ex.exec_id, ex.exec_id, None, None,
                            {"Error": _error(ex.error)}, note=error_line(ex.error, 120)))
    for n, e in enumerate(events, 1):
        e.event_id = n
    return events


def _summary(e: Event) -> str:
    parts = [e.note] if e.note else []
    retry = e.details.get("RetryDetails") or {}
    if e.event_type == "StepFailed" and retry.get("NextAttemptDelaySeconds"):
        parts.append(f"attempt {retry['CurrentAttempt']}, retry in {retry['NextAttemptDelaySeconds']}s")
    return "; ".join(parts)


def format_history(events: list[Event]) -> str:
    """A human-readable table, names indented by nesting depth."""
    rows = []
    for e in events:
        when = _dt.datetime.fromtimestamp(e.timestamp).strftime("%H:%M:%S.%f")[:-3]
        name = "  " * e.depth + (e.name if e.name is not None else "-")
        rows.append((str(e.event_id), when, e.event_type, e.sub_type or "", name, _summary(e)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)] if rows else [0] * 5
    lines = []
    for r in rows:
        cells = [r[0].rjust(widths[0])] + [r[i].ljust(widths[i]) for i in range(1, 5)] + [r[5]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
