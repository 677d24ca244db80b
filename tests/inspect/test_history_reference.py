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

import pytest

import durable_mp.cli.main as cli
from durable_mp import durable_execution
from durable_mp.operation.callback import decode_callback_id, send_callback_success
from durable_mp.store.facade import Store
from util import TESTS

HERE = TESTS  # data/ and tools/ are shared by the whole suite
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


def _group_branches(events: list[dict]) -> list[dict]:
    """Inside each batch, the events of branch 0, then of branch 1, ... (order within kept)."""
    parent = {e["Id"]: e.get("ParentId") for e in events if "Id" in e}
    batches = {e["Id"] for e in events if e.get("SubType") in ("Parallel", "Map")}
    branch_rank: dict[str, int] = {}
    for e in events:
        if e["EventType"] == "ContextStarted" and e.get("ParentId") in batches:
            branch_rank.setdefault(e["Id"], int(e["Name"].rsplit("-", 1)[-1]))

    def branch_of(op_id: str | None) -> str | None:
        while op_id is not None and op_id not in branch_rank:
            op_id = parent.get(op_id)
        return op_id

    out: list[dict] = []
    i = 0
    while i < len(events):
        e = events[i]
        out.append(e)
        i += 1
        if e["EventType"] == "ContextStarted" and e["Id"] in batches:
            inner = []
            while i < len(events) and branch_of(events[i].get("Id")) is not None \
                    and parent.get(branch_of(events[i].get("Id"))) == e["Id"]:
                inner.append(events[i])
                i += 1
            out.extend(sorted(inner, key=lambda x: branch_rank[branch_of(x["Id"])]))
    return out


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


@pytest.mark.process_free
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


@pytest.mark.process_free
def test_callback_started_carries_a_usable_id_and_its_timeouts(store_path, capsys):
    events = run_durable_mp("callback", store_path, capsys)
    started = next(e for e in events if e["EventType"] == "CallbackStarted")
    details = started["CallbackStartedDetails"]
    assert details["Timeout"] == 60 and details["HeartbeatTimeout"] == 30
    assert decode_callback_id(details["CallbackId"]) == ("callback", "", started["Id"])
