"""durable_mp's history of a handler equals the reference's history of the same handler, event by event.

The reference histories in ``tests/data/reference_history/*.json`` were recorded from the
reference SDK's local runner (``tests/tools/record_reference_history.py`` re-records them);
the handlers are ``tests/tools/history_handlers.py``, written once for both SDKs.  Each
test runs one handler on durable_mp, reads the history from the store as
``durable-mp history ID --json`` prints it, and compares every field of every event
after normalising only what is specific to a run or to the runtime:

* ``EventTimestamp`` and a wait's ``ScheduledEndTimestamp`` (wall-clock) are dropped; the
  order of events is compared instead.
* The execution's ``Id``/``Name`` (the runner's invocation id and "execution-name"; ours
  is the execution id) and ``ExecutionTimeout`` (the runner's timeout; durable_mp has none).
* ``CallbackId`` is an opaque token naming the run (the runner's ARN, our execution id);
  it is replaced by a placeholder here and checked separately to resolve to the callback.
* ``InvocationCompleted``: the reference suspends at every wait, retry delay and poll and
  is re-invoked, so it records one invocation per suspension, without details; a durable_mp
  driver runs the handler through in one invocation (one per run, with start/end details).
  The reference's invocations are collapsed into one before the closing event; EventIds
  are renumbered after collapsing (and must then match exactly).
* ``StackTrace`` in errors: durable_mp records the worker-side traceback (issue 10, remote
  tracebacks), the local runner records none.  SDK exception types lose their module
  (``aws_durable_execution_sdk_python.exceptions.StepError`` vs ``durable_mp.exceptions.StepError``).
* ``CallbackStartedDetails.Timeout``/``HeartbeatTimeout``: the service records them, the
  local runner does not (reference notes §11); ours are asserted, then dropped.
* ``Truncated`` of an ``Error``: the runner builds the error of some events
  (``ContextFailed``, ``CallbackTimedOut``) as if execution data had been excluded
  (``truncated = not include``) and says True although message and type are there;
  ours says False.  Truncated of results and inputs is compared.
* Branches of a parallel/map really run concurrently, so their events interleave
  differently between runs of either SDK: inside a batch, events are stably grouped by
  branch (index order), keeping the order within each branch.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

import durable_mp.cli.main as cli
from durable_mp import durable_execution
from durable_mp.core.records import operation_id
from durable_mp.operation.callback import decode_callback_id, send_callback_success
from durable_mp.store.facade import Store

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "reference_history"
sys.path.insert(0, str(HERE / "tools"))
from history_handlers import CALLBACK_RESULT, NEEDS_CALLBACK, handlers  # noqa: E402

pytestmark = pytest.mark.timeout(90)
RUN_ID = "<run>"
CALLBACK_WAIT_S = 30.0
NAMES = sorted(p.stem for p in DATA.glob("*.json"))


def _answer_callback(store: Store, exec_id: str, stop: threading.Event) -> None:
    """Complete the callback the way an outside system would: find its id in the history."""
    deadline = time.monotonic() + CALLBACK_WAIT_S
    while not stop.is_set() and time.monotonic() < deadline:
        from durable_mp.inspect.history import build_history

        ex = store.get_execution(exec_id)
        if ex is not None:
            for e in build_history(ex, store.ops(exec_id)):
                if e.event_type == "CallbackStarted":
                    send_callback_success(e.details["CallbackId"], CALLBACK_RESULT.encode(), store=store)
                    return
        time.sleep(0.05)


def run_durable_mp(name: str, store_path: str, capsys) -> list[dict]:
    fn = durable_execution(handlers("durable_mp")[name])
    store = Store(store_path)
    stop = threading.Event()
    helper = None
    if name in NEEDS_CALLBACK:
        helper = threading.Thread(target=_answer_callback, args=(store, name, stop), daemon=True)
        helper.start()
    try:
        fn.run({"job": name}, execution_id=name, store=store)
    except Exception:  # noqa: BLE001 - a failing handler still has a history to compare
        pass
    finally:
        stop.set()
        if helper is not None:
            helper.join()
        store.close()
    capsys.readouterr()
    assert cli.main(["history", name, "--json", "--store", store_path]) == 0
    return json.loads(capsys.readouterr().out)


def _short_type(error: dict) -> dict:
    out = {k: v for k, v in error.items() if k != "StackTrace"}
    if "ErrorType" in out and out["ErrorType"]:
        out["ErrorType"] = out["ErrorType"].rsplit(".exceptions.", 1)[-1]
    return out


def _short_envelope_errors(node: object) -> object:
    """``_short_type`` for every error map inside a (default-serdes) envelope: a BatchResult's items."""
    if isinstance(node, list):
        return [_short_envelope_errors(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _short_envelope_errors(v) for k, v in node.items() if k != "StackTrace"}
    kind = out.get("ErrorType")
    if isinstance(kind, dict) and isinstance(kind.get("v"), str):
        out["ErrorType"] = {**kind, "v": kind["v"].rsplit(".exceptions.", 1)[-1]}
    return out


def _batch_payload(result: dict) -> dict:
    text = result.get("Payload")
    if not isinstance(text, str) or '"t":"br"' not in text:
        return result
    return {**result, "Payload": json.dumps(_short_envelope_errors(json.loads(text)), sort_keys=True)}


def _normalise_event(e: dict) -> dict:
    e = {k: v for k, v in e.items() if k != "EventTimestamp"}
    kind = e["EventType"]
    details = dict(e.get(f"{kind}Details") or {})
    if kind.startswith("Execution"):
        e["Id"], e["Name"] = RUN_ID, RUN_ID
        details.pop("ExecutionTimeout", None)
    if kind == "InvocationCompleted":
        details = {}
    if "ScheduledEndTimestamp" in details:
        details["ScheduledEndTimestamp"] = RUN_ID
    if kind == "CallbackStarted":
        details["CallbackId"] = RUN_ID
        details.pop("Timeout", None)
        details.pop("HeartbeatTimeout", None)
    if kind == "ContextSucceeded" and e.get("SubType") in ("Map", "Parallel") and "Result" in details:
        details["Result"] = _batch_payload(details["Result"])
    if "Error" in details:
        details["Error"] = {"Payload": _short_type(details["Error"].get("Payload") or {})}
    if f"{kind}Details" in e or kind == "InvocationCompleted":
        e[f"{kind}Details"] = details
    return e


def _collapse_invocations(events: list[dict]) -> list[dict]:
    invocations = [i for i, e in enumerate(events) if e["EventType"] == "InvocationCompleted"]
    if len(invocations) <= 1:
        return events
    keep = invocations[-1]
    return [e for i, e in enumerate(events) if e["EventType"] != "InvocationCompleted" or i == keep]


MAX_BRANCHES = 64  # branch indices searched when attributing an event to its branch
MAX_BRANCH_OPS = 16  # operation counter values searched inside a FLAT branch


def _branch_index(batch_id: str) -> dict[str, int]:
    """Op id -> branch index for the operations directly under a batch.

    NESTED: the branch's context op (``operation_id(batch, i)``).  FLAT: the branch has no
    op; its operations hang off the batch with ids ``operation_id(operation_id(batch, i), k)``.
    """
    out: dict[str, int] = {}
    for i in range(MAX_BRANCHES):
        branch = operation_id(batch_id, i)
        out[branch] = i
        for k in range(1, MAX_BRANCH_OPS + 1):
            out[operation_id(branch, k)] = i
    return out


def _group_branches(events: list[dict]) -> list[dict]:
    """Inside each batch, the events of branch 0, then of branch 1, ... (order within kept), recursively."""
    parent = {e["Id"]: e.get("ParentId") for e in events if "Id" in e}
    batches = {e["Id"] for e in events if e.get("SubType") in ("Parallel", "Map")}
    indices: dict[str, dict[str, int]] = {}

    def top_under(op_id: str | None, batch_id: str) -> str | None:
        """The ancestor of ``op_id`` (or itself) whose parent is ``batch_id``; None if not inside it."""
        while op_id is not None and op_id != batch_id:
            if parent.get(op_id) == batch_id:
                return op_id
            op_id = parent.get(op_id)
        return None

    def group(seq: list[dict]) -> list[dict]:
        out: list[dict] = []
        i = 0
        while i < len(seq):
            e = seq[i]
            out.append(e)
            i += 1
            if e["EventType"] == "ContextStarted" and e["Id"] in batches:
                batch_id = e["Id"]
                index = indices.setdefault(batch_id, _branch_index(batch_id))
                inner = []
                while i < len(seq) and top_under(seq[i].get("Id"), batch_id) is not None:
                    inner.append(seq[i])
                    i += 1
                inner.sort(key=lambda x: index.get(top_under(x["Id"], batch_id), MAX_BRANCHES))
                out.extend(group(inner))
        return out

    return group(events)


def normalise(events: list[dict]) -> list[dict]:
    events = _group_branches(_collapse_invocations(events))
    out = []
    for n, e in enumerate(events, 1):
        e = _normalise_event(e)
        e["EventId"] = n
        out.append(e)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_history_matches_the_reference_event_by_event(name, store_path, capsys):
    reference = json.loads((DATA / f"{name}.json").read_text())["events"]
    ours = run_durable_mp(name, store_path, capsys)
    assert [e["EventId"] for e in ours] == list(range(1, len(ours) + 1))
    for e in ours:
        assert f"{e['EventType']}Details" in e, e  # every event has its details object, empty ones too
    want, got = normalise(reference), normalise(ours)
    for i, (w, g) in enumerate(zip(want, got, strict=False)):
        assert g == w, f"event {i + 1} differs"
    assert len(got) == len(want), [e["EventType"] for e in got]


def test_every_operation_type_is_covered():
    kinds = set()
    for name in NAMES:
        kinds |= {e["EventType"] for e in json.loads((DATA / f"{name}.json").read_text())["events"]}
    for wanted in ("StepStarted", "StepSucceeded", "StepFailed", "ContextStarted", "ContextSucceeded",
                   "WaitStarted", "WaitSucceeded", "CallbackStarted", "CallbackSucceeded", "CallbackTimedOut",
                   "InvocationCompleted", "ExecutionSucceeded", "ExecutionFailed", "ContextFailed"):
        assert wanted in kinds
    subtypes = {e.get("SubType") for name in NAMES for e in json.loads((DATA / f"{name}.json").read_text())["events"]}
    assert {"Step", "RunInChildContext", "Parallel", "ParallelBranch", "Map", "MapIteration", "Wait",
            "WaitForCondition", "Callback", "WaitForCallback"} <= subtypes


def test_callback_started_carries_a_usable_id_and_its_timeouts(store_path, capsys):
    events = run_durable_mp("callback", store_path, capsys)
    started = next(e for e in events if e["EventType"] == "CallbackStarted")
    details = started["CallbackStartedDetails"]
    assert details["Timeout"] == 60 and details["HeartbeatTimeout"] == 30
    assert decode_callback_id(details["CallbackId"]) == ("callback", "", started["Id"])
