"""``durable-mp history``: the reference's event model, derived from the records.

The reference (§7 of the API notes) observed, for ``parallel([step, const]); wait(2s)``::

    1 ExecutionStarted · 2 ContextStarted Parallel 'p' · 3 ContextStarted ParallelBranch
    'parallel-branch-0' · 4 StepStarted Step 's' · 5 StepSucceeded · 6 ContextStarted
    ParallelBranch 'parallel-branch-1' · 7 ContextSucceeded branch-1 · 8 ContextSucceeded
    branch-0 · 9 ContextSucceeded Parallel · 10 WaitStarted Wait 'w' · 11 InvocationCompleted
    · 12 WaitSucceeded · 13 InvocationCompleted · 14 ExecutionSucceeded

durable_mp never suspends inside a run, so a run has one ``InvocationCompleted`` (closing
it) where the reference has one per suspension; everything else must match event for
event, up to the interleaving of branches that really ran concurrently.  The full
comparison with recorded reference histories is ``test_history_reference.py``.
"""

from __future__ import annotations

import datetime as dt
import json
import textwrap
import uuid

import pytest

import durable_mp.cli.main as cli
from durable_mp.inspect.history import build_history, format_history
from durable_mp.cli.loader import load_handler
from durable_mp.core.records import Attempt, operation_id
from durable_mp.store.records import SUCCEEDED, ExecutionRecord
from util import rec

REFERENCE = [
    ("ExecutionStarted", None, None),
    ("ContextStarted", "Parallel", "p"),
    ("ContextStarted", "ParallelBranch", "parallel-branch-0"),
    ("StepStarted", "Step", "s"),
    ("StepSucceeded", "Step", "s"),
    ("ContextStarted", "ParallelBranch", "parallel-branch-1"),
    ("ContextSucceeded", "ParallelBranch", "parallel-branch-1"),
    ("ContextSucceeded", "ParallelBranch", "parallel-branch-0"),
    ("ContextSucceeded", "Parallel", "p"),
    ("WaitStarted", "Wait", "w"),
    ("InvocationCompleted", None, None),
    ("WaitSucceeded", "Wait", "w"),
    ("InvocationCompleted", None, None),
    ("ExecutionSucceeded", None, None),
]

JOBS = textwrap.dedent(
    """
    import time
    from durable_mp import durable_execution
    from durable_mp.config import CompletionConfig, Duration, ParallelConfig, StepConfig
    from durable_mp.retries import JitterStrategy, RetryStrategyConfig, create_retry_strategy

    def with_step(ctx):
        return ctx.step(lambda sc: "done", name="s")

    def const(ctx):
        return 42

    @durable_execution
    def reference_job(event, ctx):
        cfg = ParallelConfig(max_concurrency=event["concurrency"])
        r = ctx.parallel([with_step, const], name="p", config=cfg)
        ctx.wait(Duration.from_seconds(2), name="w")
        return r.get_results()

    RETRY = StepConfig(retry_strategy=create_retry_strategy(RetryStrategyConfig(
        max_attempts=3, initial_delay=Duration.from_seconds(1), jitter_strategy=JitterStrategy.NONE)))

    def flaky(sc):
        if sc.attempt < 2:
            raise RuntimeError(f"attempt {sc.attempt} failed")
        return sc.attempt

    def doomed(sc):
        raise ValueError("nope")

    def failing(ctx):
        ctx.step(doomed, name="doomed",
                 config=StepConfig(retry_strategy=create_retry_strategy(RetryStrategyConfig(max_attempts=1))))

    @durable_execution
    def retry_job(event, ctx):
        r = ctx.parallel([lambda c: c.step(flaky, name="flaky", config=RETRY), failing], name="mixed",
                         config=ParallelConfig(completion_config=CompletionConfig.all_completed()))
        return [item.status.value for item in r.all]
    """
)


@pytest.fixture
def jobs(tmp_path):
    path = tmp_path / f"hist_{uuid.uuid4().hex[:10]}.py"
    path.write_text(JOBS)
    return str(path)


def history(capsys, store, exec_id):
    assert cli.main(["history", exec_id, "--json", "--store", store]) == 0
    return json.loads(capsys.readouterr().out)


def key(e):
    return (e["EventType"], e.get("SubType"), e.get("Name") if e["EventType"][:9] != "Execution" else None)


def reference_without_invocations():
    """The reference's events with its per-suspension invocations collapsed into the last one."""
    out = [k for k in REFERENCE if k[0] != "InvocationCompleted"]
    out.insert(len(out) - 1, ("InvocationCompleted", None, None))
    return out


def check_well_formed(events, exec_id):
    assert [e["EventId"] for e in events] == list(range(1, len(events) + 1))
    for e in events:
        assert set(e) >= {"EventType", "EventId", "EventTimestamp", f"{e['EventType']}Details"}
        dt.datetime.fromisoformat(e["EventTimestamp"])
    assert events[0]["Id"] == events[-1]["Id"] == exec_id
    assert events[-2]["EventType"] == "InvocationCompleted"
    events = [dict(e) for e in events if e["EventType"] != "InvocationCompleted"]
    ids = {e["Id"] for e in events}
    for e in events[1:-1]:
        e.setdefault("ParentId", None)
        assert e["ParentId"] is None or e["ParentId"] in ids
        started = next(x for x in events if x["Id"] == e["Id"])
        assert started["EventType"].endswith("Started"), "an operation's first event is its start"
        if e["ParentId"] is not None:
            parent_start = next(x for x in events if x["Id"] == e["ParentId"])
            assert parent_start["EventId"] < e["EventId"], "a child's events come after its parent's start"
            parent_end = [x for x in events if x["Id"] == e["ParentId"] and not x["EventType"].endswith("Started")]
            assert all(e["EventId"] < x["EventId"] for x in parent_end), "and before the parent's end"


@pytest.mark.timeout(60)
def test_parallel_job_matches_the_reference_event_for_event(jobs, store_path, capsys):
    handler, _ = load_handler(f"{jobs}:reference_job")
    assert handler.run({"concurrency": 1}, execution_id="ref", store=store_path, skip_time=True) == ["done", 42]
    events = history(capsys, store_path, "ref")
    check_well_formed(events, "ref")
    # branches one at a time: branch-0's events close before branch-1 starts
    expected = reference_without_invocations()
    b0_end = expected.index(("ContextSucceeded", "ParallelBranch", "parallel-branch-0"))
    expected.insert(expected.index(("ContextStarted", "ParallelBranch", "parallel-branch-1")),
                    expected.pop(b0_end))
    assert [key(e) for e in events] == expected

    by_id = {e["Id"]: e for e in events if e["EventType"].endswith("Started")}
    parallel = next(e for e in events if e.get("SubType") == "Parallel")
    assert "ParentId" not in parallel
    for branch in (e for e in events if e.get("SubType") == "ParallelBranch"):
        assert branch["ParentId"] == parallel["Id"]
    step = next(e for e in events if e["EventType"] == "StepSucceeded")
    assert by_id[step["ParentId"]]["Name"] == "parallel-branch-0"
    assert step["StepSucceededDetails"]["Result"] == {"Truncated": False, "Payload": '"done"'}
    assert step["Id"] == operation_id(operation_id(parallel["Id"], 0), 1)
    wait = next(e for e in events if e["EventType"] == "WaitStarted")
    assert wait["WaitStartedDetails"]["Duration"] == 2
    succeeded = events[-1]["ExecutionSucceededDetails"]["Result"]
    assert json.loads(succeeded["Payload"]) == ["done", 42]


@pytest.mark.timeout(60)
def test_concurrent_branches_give_the_reference_events_in_a_nested_order(jobs, store_path, capsys):
    handler, _ = load_handler(f"{jobs}:reference_job")
    handler.run({"concurrency": 2}, execution_id="conc", store=store_path, skip_time=True)
    events = history(capsys, store_path, "conc")
    check_well_formed(events, "conc")
    assert sorted(map(key, events), key=repr) == sorted(reference_without_invocations(), key=repr)
    order = [key(e) for e in events]
    assert order[:2] == reference_without_invocations()[:2]
    assert order[-4:] == reference_without_invocations()[-4:]  # Parallel done, wait, execution done


@pytest.mark.timeout(60)
def test_retries_and_failures(jobs, store_path, capsys):
    handler, _ = load_handler(f"{jobs}:retry_job")
    assert handler.run({}, execution_id="retry", store=store_path) == ["SUCCEEDED", "FAILED"]
    events = history(capsys, store_path, "retry")
    check_well_formed(events, "retry")
    flaky = [e for e in events if e.get("Name") == "flaky"]
    assert [e["EventType"] for e in flaky] == ["StepStarted", "StepFailed", "StepStarted", "StepSucceeded"]
    failed = flaky[1]["StepFailedDetails"]
    assert failed["RetryDetails"] == {"CurrentAttempt": 1, "NextAttemptDelaySeconds": 1}
    assert failed["Error"]["Payload"]["ErrorType"] == "RuntimeError"
    assert failed["Error"]["Payload"]["ErrorMessage"] == "attempt 1 failed"
    assert flaky[3]["StepSucceededDetails"] == {"Result": {"Truncated": False, "Payload": "2"}}

    doomed = [e for e in events if e.get("Name") == "doomed"]
    assert [e["EventType"] for e in doomed] == ["StepStarted", "StepFailed"]
    assert doomed[1]["StepFailedDetails"]["RetryDetails"] == {"CurrentAttempt": 1, "NextAttemptDelaySeconds": 0}
    branch_failed = next(e for e in events if e["EventType"] == "ContextFailed")
    assert branch_failed["SubType"] == "ParallelBranch" and branch_failed["Name"] == "parallel-branch-1"
    assert "StepError" in branch_failed["ContextFailedDetails"]["Error"]["Payload"]["ErrorType"]
    assert events[-1]["EventType"] == "ExecutionSucceeded"

    assert cli.main(["history", "retry", "--store", store_path]) == 0
    text = capsys.readouterr().out
    assert "RuntimeError: attempt 1 failed" in text


@pytest.mark.process_free
def test_order_nests_even_when_process_clocks_disagree():
    """A worker's clock a little behind the driver's must not put a child before its parent."""
    p = operation_id("", 1)
    b0 = operation_id(p, 0)
    s = operation_id(b0, 1)
    ops = [
        rec(p, "", "CONTEXT", "Parallel", "p", 100.0, 101.0, extra={"completion_reason": "ALL_COMPLETED"}),
        rec(b0, p, "CONTEXT", "ParallelBranch", "parallel-branch-0", 99.9, 100.8, pid=7),  # skewed clock
        rec(s, b0, "STEP", "Step", "s", 99.95, 101.5, attempt=1,  # ends after its parent: skew again
             attempts=(Attempt(1, 99.95, 101.5, 7),)),
    ]
    ex = ExecutionRecord("x", SUCCEEDED, "m:h", None, None, None, 99.0, 99.0, 102.0, 0, 0.0, 1)
    events = build_history(ex, ops)
    assert [(e.event_type, e.name) for e in events] == [
        ("ExecutionStarted", "x"), ("ContextStarted", "p"), ("ContextStarted", "parallel-branch-0"),
        ("StepStarted", "s"), ("StepSucceeded", "s"), ("ContextSucceeded", "parallel-branch-0"),
        ("ContextSucceeded", "p"), ("InvocationCompleted", None), ("ExecutionSucceeded", "x")]
    assert [e.event_id for e in events] == list(range(1, 10))
    assert events[3].to_dict()["EventTimestamp"].startswith("1970-01-01T00:01:39.950")
    table = format_history(events)
    assert table.splitlines()[3].split()[2:] == ["StepStarted", "Step", "s"]


@pytest.mark.process_free
def test_pending_and_abandoned_operations():
    p = operation_id("", 1)
    b0, b1 = operation_id(p, 0), operation_id(p, 1)
    s = operation_id(b0, 1)
    err = {"ErrorMessage": "down", "ErrorType": "ConnectionError"}
    ops = [
        rec(p, "", "CONTEXT", "Parallel", "p", 10.0, None, status="STARTED"),
        rec(b0, p, "CONTEXT", "ParallelBranch", "parallel-branch-0", 10.1, None, status="STARTED"),
        rec(s, b0, "STEP", "Step", "call", 10.2, None, status="PENDING", attempt=2, next_attempt_ts=16.0,
             attempts=(Attempt(1, 10.2, 10.5, 7, err), Attempt(2, 11.5, 12.0, 7, err))),
        rec(b1, p, "CONTEXT", "ParallelBranch", "parallel-branch-1", 10.1, None, status="STARTED"),
    ]
    ex = ExecutionRecord("y", "RUNNING", "m:h", None, None, None, 9.0, 9.0, None, 0, 0.0, 1)
    events = build_history(ex, ops)
    kinds = [(e.event_type, e.name) for e in events]
    assert kinds[0] == ("ExecutionStarted", "y")
    assert ("ExecutionSucceeded", "y") not in kinds and ("ExecutionFailed", "y") not in kinds
    steps = [e for e in events if e.name == "call"]
    assert [e.event_type for e in steps] == ["StepStarted", "StepFailed", "StepStarted", "StepFailed"]
    assert steps[1].details["RetryDetails"] == {"CurrentAttempt": 1, "NextAttemptDelaySeconds": 1}
    assert steps[3].details["RetryDetails"] == {"CurrentAttempt": 2, "NextAttemptDelaySeconds": 4}
    assert not any(e.event_type == "ContextSucceeded" for e in events), "STARTED contexts have no end event"
