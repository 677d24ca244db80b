"""The event history of an execution, in the reference's event model, derived from its records.

durable_mp stores one checkpoint per operation (its latest state plus the list of its
attempts), not a log of events.  The events the reference service would have written
follow from those records:

* the execution: ``ExecutionStarted`` (creation time) ... ``ExecutionSucceeded/Failed``;
* a context (``Parallel``, ``Map``, ``ParallelBranch``, ``MapIteration``,
  ``RunInChildContext``): ``ContextStarted``, then ``ContextSucceeded/Failed`` unless it
  is still ``STARTED`` (running, or abandoned by early completion);
* a step: per attempt ``StepStarted`` then ``StepSucceeded`` or ``StepFailed``; a failed
  attempt that was retried carries ``RetryDetails(CurrentAttempt, NextAttemptDelaySeconds)``
  and is followed by the next attempt's ``StepStarted``, as in the reference;
* a wait: ``WaitStarted`` (with its scheduled end) and ``WaitSucceeded``.

Events are numbered 1.. in timestamp order, with the tree deciding ties and clock
jitter between processes: a parent's start comes before anything inside it and its end
after, so the sequence always nests.  ``InvocationCompleted`` has no counterpart (a
durable_mp run does not suspend between invocations) and is not produced.
"""

from __future__ import annotations

import datetime as _dt
import heapq
import json
import pickle
from dataclasses import dataclass, field
from typing import Any

from durable_mp.core.records import OpRecord, OpStatus, OpType
from durable_mp.inspect.tree import OpTree, error_line
from durable_mp.store.records import FAILED, SUCCEEDED, ExecutionRecord

PAYLOAD_PREVIEW_CHARS = 1000  # execution input/result longer than this (as JSON) are not inlined


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
    op_id: str
    name: str | None
    sub_type: str | None = None
    parent_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    event_id: int = 0
    depth: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "EventType": self.event_type,
            "SubType": self.sub_type,
            "EventId": self.event_id,
            "Id": self.op_id,
            "Name": self.name,
            "EventTimestamp": iso(self.timestamp),
            "ParentId": self.parent_id,
        }
        if self.details:
            out[f"{self.event_type}Details"] = self.details
        return out


def _error(error: dict | None) -> dict:
    return {"Payload": dict(error or {}), "Truncated": False}


def _size(payload: bytes | str | None) -> int | None:
    if payload is None:
        return None
    return len(payload.encode()) if isinstance(payload, str) else len(payload)


def _payload(data: bytes | None) -> dict:
    """``{"Payload": json, "Size": n}`` for a pickled execution input/result (JSON when it is)."""
    out: dict[str, Any] = {"Size": _size(data) or 0}
    if data is None:
        return out
    try:
        text = json.dumps(pickle.loads(data), ensure_ascii=False)
    except Exception:  # noqa: BLE001 - not JSON, or needs classes this process cannot import
        return out
    if len(text) <= PAYLOAD_PREVIEW_CHARS:
        out["Payload"] = text
    else:
        out["Truncated"] = True
    return out


def _seconds(value: float) -> int:
    return max(0, int(round(value)))


def _step_events(rec: OpRecord, ev) -> list[Event]:
    """StepStarted / StepFailed(+retry) ... per attempt, then the terminal event."""
    out: list[Event] = []
    attempts = list(rec.attempts)
    for i, att in enumerate(attempts):
        out.append(ev("StepStarted", att.start_ts))
        last = i == len(attempts) - 1
        end = att.end_ts if att.end_ts is not None else att.start_ts
        if att.error is None:
            if last and rec.status == OpStatus.SUCCEEDED:
                break  # the terminal event below
            out.append(ev("StepSucceeded", end, {"RetryDetails": {"CurrentAttempt": att.number}}))
            continue
        if last and rec.status == OpStatus.FAILED:
            break
        retry: dict[str, Any] = {"CurrentAttempt": att.number}
        if getattr(att, "retry_delay", None) is not None:  # what the retry strategy decided
            retry["NextAttemptDelaySeconds"] = _seconds(att.retry_delay)
        elif not last:
            retry["NextAttemptDelaySeconds"] = _seconds(attempts[i + 1].start_ts - end)
        elif rec.next_attempt_ts is not None:
            retry["NextAttemptDelaySeconds"] = _seconds(rec.next_attempt_ts - end)
        out.append(ev("StepFailed", end, {"Error": _error(att.error), "RetryDetails": retry}))
    if rec.status == OpStatus.STARTED and rec.attempt > len(attempts):
        # the running attempt (only checkpointed for at-most-once steps)
        out.append(ev("StepStarted", attempts[-1].end_ts if attempts and attempts[-1].end_ts else rec.start_ts))
    if not attempts and rec.status in (OpStatus.SUCCEEDED, OpStatus.FAILED):
        out.append(ev("StepStarted", rec.start_ts))
    end = rec.end_ts if rec.end_ts is not None else rec.start_ts
    if rec.status == OpStatus.SUCCEEDED:
        out.append(ev("StepSucceeded", end, {"ResultSize": _size(rec.result),
                                             "RetryDetails": {"CurrentAttempt": rec.attempt}}))
    elif rec.status == OpStatus.FAILED:
        out.append(ev("StepFailed", end, {"Error": _error(rec.error),
                                          "RetryDetails": {"CurrentAttempt": rec.attempt}}))
    return out


def _own_events(rec: OpRecord, depth: int) -> tuple[list[Event], list[Event]]:
    """(events before the children of ``rec``, events after them)."""
    parent = rec.parent_id or None

    def ev(kind: str, ts: float, details: dict | None = None) -> Event:
        return Event(kind, ts, rec.op_id, rec.name, rec.sub_type, parent, details or {}, depth=depth)

    end = rec.end_ts if rec.end_ts is not None else rec.start_ts
    if rec.op_type == OpType.STEP:
        return _step_events(rec, ev), []
    if rec.op_type == OpType.WAIT:
        extra = rec.extra or {}
        started = {}
        if extra.get("scheduled_end") is not None:
            started = {"Duration": _seconds(extra["scheduled_end"] - rec.start_ts),
                       "ScheduledEndTimestamp": iso(extra["scheduled_end"])}
        after = [ev("WaitSucceeded", end, {"Duration": started.get("Duration")})] \
            if rec.status == OpStatus.SUCCEEDED else []
        return [ev("WaitStarted", rec.start_ts, started)], after
    kind = "Context" if rec.op_type == OpType.CONTEXT else rec.op_type.title()
    after = []
    if rec.status == OpStatus.SUCCEEDED:
        details: dict[str, Any] = {}
        if rec.result is not None:
            details["ResultSize"] = _size(rec.result)
        extra = rec.extra or {}
        if "completion_reason" in extra:
            details["CompletionReason"] = extra["completion_reason"]
        after = [ev(f"{kind}Succeeded", end, details)]
    elif rec.status == OpStatus.FAILED:
        after = [ev(f"{kind}Failed", end, {"Error": _error(rec.error)})]
    return [ev(f"{kind}Started", rec.start_ts)], after


def _monotone(events: list[Event], floor: float) -> list[tuple[float, Event]]:
    """Pair events with non-decreasing sort keys (never before ``floor``)."""
    out = []
    key = floor
    for e in events:
        key = max(key, e.timestamp)
        out.append((key, e))
    return out


def _subtree(tree: OpTree, rec: OpRecord, depth: int, floor: float) -> list[tuple[float, Event]]:
    before, after = _own_events(rec, depth)
    head = _monotone(before, floor)
    start_key = head[-1][0] if head else max(floor, rec.start_ts)
    body = _merge([_subtree(tree, child, depth + 1, start_key) for child in tree.children(rec.op_id)])
    inner_end = body[-1][0] if body else start_key
    return head + body + _monotone(after, inner_end)


def _merge(streams: list[list[tuple[float, Event]]]) -> list[tuple[float, Event]]:
    """Merge by key; equal keys keep stream order (earlier-started sibling first)."""
    tagged = [[(key, n, i, e) for i, (key, e) in enumerate(s)] for n, s in enumerate(streams)]
    return [(key, e) for key, _n, _i, e in heapq.merge(*tagged)]


def build_history(execution: ExecutionRecord, ops: list[OpRecord]) -> list[Event]:
    """All events of ``execution`` in order, ``event_id`` from 1."""
    tree = OpTree(execution, ops)
    ex = execution
    started = Event("ExecutionStarted", ex.created_ts, ex.exec_id, ex.exec_id, None, None,
                    {"Input": _payload(ex.input), "Handler": ex.handler})
    body = _merge([_subtree(tree, rec, 0, ex.created_ts) for rec in tree.children("")])
    events = [started] + [e for _key, e in body]
    end = max([ex.ended_ts or ex.created_ts] + [e.timestamp for e in events])
    if ex.status == SUCCEEDED:
        events.append(Event("ExecutionSucceeded", ex.ended_ts or end, ex.exec_id, ex.exec_id, None, None,
                            {"Result": _payload(ex.result)}))
    elif ex.status == FAILED:
        events.append(Event("ExecutionFailed", ex.ended_ts or end, ex.exec_id, ex.exec_id, None, None,
                            {"Error": _error(ex.error)}))
    for n, e in enumerate(events, 1):
        e.event_id = n
    return events


def _summary(e: Event) -> str:
    d = e.details
    parts = []
    if "Error" in d:
        parts.append(error_line(d["Error"].get("Payload"), 120))
    retry = d.get("RetryDetails") or {}
    if e.event_type == "StepFailed" and "NextAttemptDelaySeconds" in retry:
        parts.append(f"attempt {retry['CurrentAttempt']}, retry in {retry['NextAttemptDelaySeconds']}s")
    elif e.event_type in ("StepSucceeded", "StepFailed") and retry.get("CurrentAttempt", 1) > 1:
        parts.append(f"attempt {retry['CurrentAttempt']}")
    if d.get("ResultSize") is not None:
        parts.append(f"result {d['ResultSize']} B")
    if "CompletionReason" in d:
        parts.append(d["CompletionReason"])
    if e.event_type == "WaitStarted" and d.get("Duration") is not None:
        parts.append(f"{d['Duration']}s")
    if e.event_type == "ExecutionStarted":
        parts.append(str(d.get("Handler")))
    return "; ".join(p for p in parts if p)


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
