"""``durable-mp report``: a self-contained HTML timeline, read back with ``html.parser``."""

from __future__ import annotations

import json
import textwrap
import uuid
from html.parser import HTMLParser

import pytest

import durable_mp.cli.main as cli
from durable_mp.inspect import timeline
from durable_mp.cli.loader import load_handler
from durable_mp.core.records import Attempt, operation_id
from durable_mp.inspect.report import render_report
from durable_mp.store.records import SUCCEEDED, ExecutionRecord
from durable_mp.inspect.tree import OpTree
from util import rec

JOBS = textwrap.dedent(
    """
    import os
    from durable_mp import durable_execution
    from durable_mp.config import CompletionConfig, Duration, ParallelConfig, StepConfig
    from durable_mp.retries import JitterStrategy, RetryStrategyConfig, create_retry_strategy

    RETRY = StepConfig(retry_strategy=create_retry_strategy(RetryStrategyConfig(
        max_attempts=3, initial_delay=Duration.from_seconds(1), jitter_strategy=JitterStrategy.NONE)))

    def ok(ctx):
        return ctx.step(lambda sc: "fine", name="ok-step")

    def broken(ctx):
        ctx.step(lambda sc: 1, name="before-the-break")
        raise KeyError("missing")

    def flaky_step(sc):
        if sc.attempt == 1:
            raise TimeoutError("slow service")
        return sc.attempt

    def flaky(ctx):
        return ctx.step(flaky_step, name="flaky", config=RETRY)

    @durable_execution
    def mixed(event, ctx):
        cfg = ParallelConfig(completion_config=CompletionConfig.all_completed())
        r = ctx.parallel([ok, ok, broken, flaky], name="mixed", config=cfg)
        return [item.status.value for item in r.all]

    def crasher(ctx):
        ctx.step(lambda sc: os._exit(9), name="exit")

    @durable_execution
    def crashing(event, ctx):
        cfg = ParallelConfig(completion_config=CompletionConfig.all_completed())
        r = ctx.parallel([ok, crasher], name="crashing", config=cfg)
        return [item.status.value for item in r.all]
    """
)


class ReportParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.bars: list[dict] = []
        self.markers: list[dict] = []
        self.tags: list[tuple[str, dict]] = []
        self.summary: dict | None = None
        self.row_labels: list[str] = []
        self._in_label = False
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        classes = (a.get("class") or "").split()
        if tag == "rect" and "bar" in classes:
            self.bars.append(a)
        elif tag == "path" and ("crash-marker" in classes or "stop-marker" in classes) and "data-op-id" in a:
            self.markers.append(a)
        elif tag == "table" and a.get("id") == "summary":
            self.summary = json.loads(a["data-summary"])
        self._in_label = tag == "text" and "row-label" in classes
        self._in_style = tag == "style"

    def handle_data(self, data):
        if self._in_label:
            self.row_labels.append(data)
        if self._in_style:
            self.style += data

    def handle_endtag(self, tag):
        self._in_label = False
        self._in_style = False


def parse(text: str) -> ReportParser:
    p = ReportParser()
    p.feed(text)
    p.close()
    return p


def assert_self_contained(p: ReportParser) -> None:
    for tag, attrs in p.tags:
        assert tag not in ("link", "img", "iframe", "object", "embed"), tag
        assert "src" not in attrs and "href" not in attrs, (tag, attrs)
    assert "url(" not in p.style and "@import" not in p.style


@pytest.fixture
def jobs(tmp_path):
    path = tmp_path / f"rep_{uuid.uuid4().hex[:10]}.py"
    path.write_text(JOBS)
    return str(path)


def report(capsys, tmp_path, store, exec_id) -> tuple[ReportParser, str]:
    out = tmp_path / f"{exec_id}.html"
    assert cli.main(["report", exec_id, "-o", str(out), "--store", store]) == 0
    capsys.readouterr()
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    return parse(text), text


@pytest.mark.timeout(60)
def test_report_has_one_bar_per_branch_and_per_attempt(jobs, tmp_path, store_path, capsys):
    handler, _ = load_handler(f"{jobs}:mixed")
    assert handler.run({}, execution_id="mixed", store=store_path) == ["SUCCEEDED", "SUCCEEDED", "FAILED",
                                                                       "SUCCEEDED"]
    p, _text = report(capsys, tmp_path, store_path, "mixed")
    assert_self_contained(p)
    for bar in p.bars:
        assert {"data-op-id", "data-status", "data-name", "data-kind", "data-pid", "data-start"} <= set(bar)

    branches = {b["data-name"]: b for b in p.bars if b["data-kind"] == "branch"}
    assert sorted(branches) == [f"parallel-branch-{i}" for i in range(4)]
    assert {n: b["data-status"] for n, b in branches.items()} == {
        "parallel-branch-0": "succeeded", "parallel-branch-1": "succeeded",
        "parallel-branch-2": "failed", "parallel-branch-3": "succeeded"}
    assert "KeyError" in branches["parallel-branch-2"]["data-error"]

    attempts = [b for b in p.bars if b["data-kind"] == "attempt"]
    flaky = sorted((b for b in attempts if b["data-name"] == "flaky"), key=lambda b: b["data-attempt"])
    assert [(b["data-attempt"], b["data-status"]) for b in flaky] == [("1", "retried"), ("2", "succeeded")]
    assert "TimeoutError: slow service" in flaky[0]["data-error"]
    assert len(attempts) == 5  # ok-step x2, before-the-break, flaky x2
    for b in attempts:  # every attempt sits in the row of the worker that ran its branch
        assert b["data-pid"] == next(x for x in branches.values() if x["data-op-id"] == b["data-branch"])["data-pid"]

    (batch,) = [b for b in p.bars if b["data-kind"] == "context"]
    assert batch["data-name"] == "mixed" and batch["data-pid"] == "driver"
    workers = {b["data-pid"] for b in branches.values()}
    assert p.row_labels == ["driver"] + [f"worker pid {pid}" for pid in sorted(workers, key=lambda w: min(
        float(b["x"]) for b in branches.values() if b["data-pid"] == w))]

    s = p.summary
    assert s["status"] == "SUCCEEDED" and s["branches"] == {"succeeded": 3, "failed": 1}
    assert s["attempts"] == 5 and s["retries"] == 1 and s["crashes"] == 0 and s["redispatched"] == 0
    assert not p.markers


@pytest.mark.timeout(60)
def test_report_marks_a_worker_crash(jobs, tmp_path, store_path, capsys):
    handler, _ = load_handler(f"{jobs}:crashing")
    assert handler.run({}, execution_id="crash", store=store_path, max_crash_retries=2) == ["SUCCEEDED", "FAILED"]
    p, text = report(capsys, tmp_path, store_path, "crash")
    crashed = next(b for b in p.bars if b["data-name"] == "parallel-branch-1")
    assert crashed["data-status"] == "failed" and crashed["data-crash"] == "WorkerCrashedError"
    assert crashed["data-pid"].isdigit(), "the crash is drawn in the row of the worker that died last"
    # one marker per death, each in the row of the worker that died; the last one is the branch's row
    assert len(p.markers) == 2 and {m["data-op-id"] for m in p.markers} == {crashed["data-op-id"]}
    assert crashed["data-pid"] in {m["data-pid"] for m in p.markers}
    assert p.summary["crashes"] == 2, "max_crash_retries=2: two worker deaths, each kept as an attempt"
    assert p.summary["redispatched"] == 1 and p.summary["failed_branches"] == 1
    assert "crashed its worker 2 times" in text  # the failures table


def _tree(ops, runs=1, started=None):
    ex = ExecutionRecord("t", SUCCEEDED, "m:h", None, None, None, 100.0, started or 100.0, 110.0, 0, 0.0, runs)
    return OpTree(ex, ops)


@pytest.mark.process_free
def test_redispatched_branch_and_abandoned_branch():
    p = operation_id("", 1)
    b0, b1 = operation_id(p, 0), operation_id(p, 1)
    s1, s2 = operation_id(b0, 1), operation_id(b0, 2)
    ops = [
        rec(p, "", "CONTEXT", "Parallel", "p", 100.0, 109.0, extra={"completion_reason": "MIN_SUCCESSFUL_REACHED"}),
        # branch 0 finished in pid 222; its first step had been run by pid 111, which died
        rec(b0, p, "CONTEXT", "ParallelBranch", "parallel-branch-0", 105.0, 108.0, pid=222),
        rec(s1, b0, "STEP", "Step", "first", 101.0, 102.0, attempt=1, attempts=(Attempt(1, 101.0, 102.0, 111),)),
        rec(s2, b0, "STEP", "Step", "second", 105.5, 107.5, attempt=1,
                 attempts=(Attempt(1, 105.5, 107.5, 222),)),
        rec(b1, p, "CONTEXT", "ParallelBranch", "parallel-branch-1", 101.0, None, status="STARTED", pid=0),
    ]
    text = render_report(_tree(ops, runs=2, started=104.0))
    r = parse(text)
    b = {x["data-name"]: x for x in r.bars if x["data-kind"] == "branch"}
    assert b["parallel-branch-0"]["data-redispatched"] == "1" and b["parallel-branch-0"]["data-pid"] == "222"
    assert b["parallel-branch-1"]["data-status"] == "started"
    worker_marker, driver_marker = sorted(r.markers, key=lambda m: m["data-pid"])
    assert worker_marker["data-pid"] == "111" and worker_marker["data-op-id"] == b0
    assert driver_marker["data-pid"] == "driver", "run 1's driver stopped: marked at its last record"
    assert {m["data-kind"] for m in r.markers} == {"stopped"}, "no worker crashed: the driver stopped"
    assert 'class="gap"' in text and r.summary["gaps_s"] == [2.0], "no driver from 102.0 (last record) to 104.0"
    first = next(x for x in r.bars if x["data-name"] == "first")
    assert first["data-pid"] == "111"
    assert r.summary["redispatched"] == 1 and r.summary["runs"] == 2
    assert 'data-run="2"' in text
    assert set(r.row_labels) == {"driver", "worker pid 111", "worker pid 222", "no worker (pid unknown)"}


@pytest.mark.process_free
def test_huge_batches_keep_every_unusual_bar(monkeypatch):
    monkeypatch.setattr(timeline, "MAX_BARS", 50)
    p = operation_id("", 1)
    ops = [rec(p, "", "CONTEXT", "Map", "m", 100.0, 109.0, extra={"completion_reason": "ALL_COMPLETED",
                                                                   "total": 500})]
    for i in range(500):
        failed = i % 100 == 7
        ops.append(rec(operation_id(p, i), p, "CONTEXT", "MapIteration", f"map-item-{i}", 100 + i / 100,
                       100.005 + i / 100, status="FAILED" if failed else "SUCCEEDED", pid=10 + i % 4,
                       error={"ErrorType": "ValueError", "ErrorMessage": "x"} if failed else None))
    r = parse(render_report(_tree(ops)))
    branches = [b for b in r.bars if b["data-kind"] == "branch"]
    assert len(branches) <= 50
    assert sum(b["data-status"] == "failed" for b in branches) == 5
    assert r.summary["branches"] == {"succeeded": 495, "failed": 5}


@pytest.mark.process_free
def test_a_stopped_run_is_drawn_as_it_was_left():
    """Issue 19 §9, on records alone: a RUNNING execution without a driver, a map item in
    flight (its step recorded, its own record not), a step whose item has no batch."""
    from durable_mp.core.records import OpType
    from durable_mp.inspect.history import iso
    from durable_mp.inspect.tree import is_placeholder, render_tree
    from util import execution_record

    m = operation_id("", 1)
    item3 = operation_id(m, 3)
    stray = operation_id("lost-parent", 1)
    ops = [
        rec(m, "", "CONTEXT", "Map", "items", 100.0, None, status="STARTED", extra={"total": 5}),
        rec(operation_id(item3, 1), item3, "STEP", "Step", "work3", 101.0, 102.5, attempt=1,
            attempts=(Attempt(1, 101.0, 102.5, 333),)),
        rec(operation_id(stray, 1), stray, "STEP", "Step", "stray", 101.5, 101.7),
    ]
    tree = OpTree(execution_record("t", created_ts=99.0, started_ts=99.0), ops)
    placeholder = tree.ops[item3]
    assert is_placeholder(placeholder) and placeholder.parent_id == m and tree.index[item3] == 3
    assert placeholder.name == "map-item-3" and placeholder.pid == 333
    assert [r.name for r in tree.children("")] == ["items", None]  # the stray step's parent, not the step
    assert tree.done_total() == (2, 3), "placeholders are no recorded operations"
    text = render_tree(tree)
    assert "execution t  INTERRUPTED" in text
    assert not [line for line in text.splitlines() if line.startswith(("├─ Step", "└─ Step"))], text

    r = parse(render_report(tree))
    assert r.summary["status"] == "INTERRUPTED"
    batch = next(b for b in r.bars if b["data-kind"] == "context")
    assert batch["data-end"] == iso(102.5), "the batch ends at the stopped run's last record, not now"
    assert max(b["data-end"] for b in r.bars) == iso(102.5)
    work = next(b for b in r.bars if b["data-name"] == "work3")
    assert work["data-pid"] == "333" and work["data-branch"] == item3
    assert all(tree.ops[b["data-op-id"]].op_type != OpType.STEP or b["data-pid"] != "driver" for b in r.bars)
