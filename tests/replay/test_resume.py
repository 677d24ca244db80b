"""A killed driver resumes from its checkpoints: nothing that finished runs again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.timeout(180)

JOB = textwrap.dedent(
    """
    import os, sys, time
    from durable_mp import durable_execution
    from durable_mp.config import ParallelConfig

    MARKERS = sys.argv[2]

    def branch(i):
        def run(ctx):
            def work(step_ctx):
                with open(os.path.join(MARKERS, f"start-{i}"), "a") as f:
                    f.write("x")
                time.sleep(0.15)
                return i * i
            value = ctx.step(work, name=f"work-{i}")
            def after(step_ctx):
                with open(os.path.join(MARKERS, f"done-{i}"), "a") as f:
                    f.write("x")
                return value + 1
            return ctx.step(after, name=f"after-{i}")
        return run

    @durable_execution
    def handler(event, ctx):
        r = ctx.parallel([branch(i) for i in range(20)], name="twenty",
                         config=ParallelConfig(max_concurrency=2))
        return r.get_results()

    if __name__ == "__main__":
        print(handler.run({"job": 1}, store=sys.argv[1], execution_id="resume-me"))
    """
)


def test_sigkilled_driver_resumes_without_rerunning_finished_branches(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    markers = tmp_path / "markers"
    markers.mkdir()
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, str(script), str(store), str(markers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while len(marker_counts(markers, "done")) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, like a power cut
    proc.wait(timeout=30)
    done_before = marker_counts(markers, "done")
    assert 8 <= len(done_before) < 20, "the kill must land mid-run"
    from durable_mp.store.facade import Store
    with Store(store) as st:
        committed = {int(r.name.rsplit("-", 1)[1]) for r in st.ops("resume-me")
                     if r.sub_type == "ParallelBranch" and r.status == "SUCCEEDED"}
    assert len(committed) >= 4, "finished branches must be checkpointed within milliseconds"

    out = subprocess.run([sys.executable, str(script), str(store), str(markers)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([i * i + 1 for i in range(20)])

    done_after = marker_counts(markers, "done")
    starts = marker_counts(markers, "start")
    assert sorted(done_after) == list(range(20))
    for i in committed:
        assert starts[i] == 1 and done_after[i] == 1, f"branch {i} finished before the kill but ran again"
    repeated = sorted(i for i in range(20) if starts[i] > 1 or done_after[i] > 1)
    # in flight at the kill (max_concurrency=2) plus at most one group-commit window (~25 ms) of finished ones
    assert len(repeated) <= 4, f"only work in flight at the kill may repeat, got {repeated}"


# -- fix and resume (docs/architecture.md "Running a handler"): a FAILED execution run again keeps what succeeded ---

from durable_mp import ExecutionFailedError, durable_execution  # noqa: E402
from durable_mp.config import StepConfig  # noqa: E402
from durable_mp.retries import RetryPresets  # noqa: E402
from durable_mp.store.facade import Store  # noqa: E402
from util import marker_counts, run_skip_time, runs_per_index  # noqa: E402


@pytest.mark.timeout(180)
def test_fix_and_resume_runs_only_the_failed_item_again(tmp_path):
    markers, flag, store = tmp_path / "m", tmp_path / "broken", str(tmp_path / "store")
    markers.mkdir()
    flag.touch()

    def make():
        config = StepConfig(retry_strategy=RetryPresets.none())

        def item(ctx, x, index, items):
            def work(step_ctx):
                with open(os.path.join(markers, f"item-{index}-{step_ctx.attempt}-{os.getpid()}-{time.time()}"),
                          "w"):
                    pass
                if index == 13 and os.path.exists(flag):
                    raise ValueError("item 13 is broken")
                return x * x
            return ctx.step(work, name="work", config=config)

        @durable_execution
        def handler(event, ctx):
            result = ctx.map(list(range(20)), item, name="twenty")
            result.throw_if_error()
            return result.get_results()

        return handler

    with pytest.raises(ExecutionFailedError, match="item 13 is broken"):
        make().run({"job": "squares"}, store=store, max_workers=2)
    first = runs_per_index(markers, "item")  # a failure stops the map from starting more items (running ones finish)
    assert first[13] == 1 and set(first.values()) == {1}
    with Store(store) as st:
        (rec,) = st.list_executions()
        assert rec.status == "FAILED"

    flag.unlink()  # the fix
    assert make().run({"job": "squares"}, store=store, max_workers=2) == [i * i for i in range(20)]
    counts = runs_per_index(markers, "item")
    assert counts[13] == 2 and all(counts[i] == 1 for i in range(20) if i != 13), counts  # only 13 again
    with Store(store) as st:
        (rec,) = st.list_executions()
        assert rec.status == "SUCCEEDED" and rec.error is None
        steps = {r.parent_id: r for r in st.ops(rec.exec_id) if r.name == "work"}
        items = {int(r.name.rsplit("-", 1)[1]): r for r in st.ops(rec.exec_id) if r.sub_type == "MapIteration"}
    step13 = steps[items[13].op_id]
    assert step13.status == "SUCCEEDED" and step13.attempt == 2  # attempt numbering continued
    assert [a.number for a in step13.attempts] == [1, 2] and step13.attempts[0].error is not None
    assert items[13].status == "SUCCEEDED" and items[13].attempt == 2  # the map item's numbering continued too
    assert len(items[13].attempts) == 1 and "item 13 is broken" in items[13].attempts[0].error["ErrorMessage"]
    assert all(steps[items[i].op_id].attempt == 1 for i in range(20) if i != 13)


@pytest.mark.timeout(120)
def test_a_failed_root_step_and_child_context_run_again_with_continuing_attempts(store_path, tmp_path):
    flag = tmp_path / "broken"
    flag.touch()
    ran = tmp_path / "ran"

    def note(what):
        with open(ran, "a") as f:
            f.write(what + "\n")

    @durable_execution
    def handler(event, ctx):
        ctx.step(lambda _: note("ok"), name="ok")

        def child(c):
            def shaky(step_ctx):
                note(f"shaky-{step_ctx.attempt}")
                if flag.exists():
                    raise OSError("disk not mounted")
                return "mounted"
            return c.step(shaky, name="shaky", config=StepConfig(retry_strategy=RetryPresets.none()))

        return ctx.run_in_child_context(child, name="child")

    with pytest.raises(ExecutionFailedError):
        handler.run(None, store=store_path, execution_id="root")
    flag.unlink()
    assert handler.run(None, store=store_path, execution_id="root") == "mounted"
    assert ran.read_text().split() == ["ok", "shaky-1", "shaky-2"]


@pytest.mark.timeout(120)
def test_a_failed_execution_can_be_kept_failed_as_in_the_reference(store_path, tmp_path):
    flag = tmp_path / "broken"
    flag.touch()
    calls = []

    @durable_execution(resume_failed=False)
    def handler(event, ctx):
        calls.append(1)
        if flag.exists():
            raise ValueError("broken")
        return "fixed"

    with pytest.raises(ExecutionFailedError):
        handler.run(None, store=store_path, execution_id="kept")
    flag.unlink()
    with pytest.raises(ExecutionFailedError, match="failed in an earlier run"):
        handler.run(None, store=store_path, execution_id="kept")
    assert calls == [1]  # nothing ran
    assert handler.run(None, store=store_path, execution_id="kept", resume_failed=True) == "fixed"


RENAME_JOB = textwrap.dedent(
    """
    import os, sys, time
    from durable_mp import durable_execution

    NAME = sys.argv[3]
    MARKERS = sys.argv[2]

    def item(ctx, x, index, items):
        def first(step_ctx):
            open(os.path.join(MARKERS, f"first-{index}-{time.time()}"), "w").close()
            return x
        v = ctx.step(first, name=NAME)
        def second(step_ctx):
            open(os.path.join(MARKERS, f"second-{index}-{time.time()}"), "w").close()
            if os.path.exists(os.path.join(MARKERS, "..", "hang")):
                time.sleep(60)  # the driver is killed here
            return v + 1
        return ctx.step(second, name="second")

    @durable_execution
    def handler(event, ctx):
        return ctx.map([1, 2, 3], item, name="three").get_results()

    if __name__ == "__main__":
        try:
            print(handler.run(None, store=sys.argv[1], execution_id="rename", max_workers=3))
        except Exception as exc:
            print(type(exc).__name__, exc, file=sys.stderr)
            sys.exit(3)
    """
)


@pytest.mark.timeout(180)
def test_renaming_a_step_after_a_kill_stops_without_failing_and_reverting_resumes(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(RENAME_JOB)
    markers = tmp_path / "markers"
    markers.mkdir()
    store = str(tmp_path / "store")
    (tmp_path / "hang").touch()
    proc = subprocess.Popen([sys.executable, str(script), store, str(markers), "first"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while len([n for n in os.listdir(markers) if n.startswith("second")]) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # the "first" checkpoints are committed (group commit: milliseconds)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    (tmp_path / "hang").unlink()

    renamed = subprocess.run([sys.executable, str(script), store, str(markers), "renamed"],
                             capture_output=True, text=True, timeout=120)
    assert renamed.returncode == 3 and "NonDeterministicExecutionError" in renamed.stderr, renamed.stderr
    assert "revert" in renamed.stderr.lower()  # says how to go on
    with Store(store) as st:
        assert st.get_execution("rename").status == "RUNNING"  # not FAILED: still resumable

    reverted = subprocess.run([sys.executable, str(script), store, str(markers), "first"],
                              capture_output=True, text=True, timeout=120)
    assert reverted.returncode == 0, reverted.stderr
    assert reverted.stdout.strip() == "[2, 3, 4]"
    assert len([n for n in os.listdir(markers) if n.startswith("first")]) == 3  # never ran again
    with Store(store) as st:
        assert st.get_execution("rename").status == "SUCCEEDED"


@pytest.mark.timeout(120)
def test_non_determinism_at_the_root_leaves_the_execution_resumable(store_path):
    names = ["first"]

    @durable_execution
    def handler(event, ctx):
        ctx.step(lambda _: 1, name=names[0])
        if names[0] == "first" and len(names) == 1:
            raise KeyboardInterrupt  # a killed run: stays RUNNING
        return "done"

    with pytest.raises(KeyboardInterrupt):
        handler.run(None, store=store_path, execution_id="nd-root")
    names[0] = "renamed"
    with pytest.raises(ExecutionFailedError, match="name checkpoint='first' current='renamed'") as info:
        handler.run(None, store=store_path, execution_id="nd-root")
    assert info.value.error.type == "durable_mp.exceptions.NonDeterministicExecutionError"
    assert "name checkpoint='first' current='renamed'" in info.value.error.message
    assert "stopped, not failed" in str(info.value)
    with Store(store_path) as st:
        assert st.get_execution("nd-root").status == "RUNNING"
    names[:] = ["first", "reverted"]
    assert handler.run(None, store=store_path, execution_id="nd-root") == "done"


# -- honest re-runs: a stored result is returned with one line saying so -------------------------------

NOTICE_JOB = textwrap.dedent(
    """
    import sys
    from durable_mp import durable_execution

    @durable_execution
    def handler(event, ctx):
        return ctx.step(lambda _: ANSWER, name="answer")

    ANSWER = 1

    if __name__ == "__main__":
        print(handler.run({"n": 1}, store=sys.argv[1]))
    """
)


def test_a_stored_result_is_returned_with_one_line_saying_so(store_path, capsys):
    @durable_execution
    def handler(event, ctx):
        return ctx.step(lambda _: 7, name="seven")

    assert handler.run(None, store=store_path, execution_id="told") == 7
    assert capsys.readouterr().err == ""  # a first run says nothing
    assert handler.run(None, store=store_path, execution_id="told") == 7
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "'told' already SUCCEEDED at " in lines[0] and "nothing ran" in lines[0]
    assert f"durable-mp delete told --store {store_path}" in lines[0] and "execution_id" in lines[0]
    assert "CHANGED" not in lines[0]


def test_a_configured_logger_gets_the_notice_instead_of_stderr(store_path, capsys, caplog):
    @durable_execution
    def handler(event, ctx):
        return 1

    handler.run(None, store=store_path, execution_id="logged")
    with caplog.at_level("INFO", logger="durable_mp"):
        handler.run(None, store=store_path, execution_id="logged")
    assert capsys.readouterr().err == ""
    assert [r.levelname for r in caplog.records if "already SUCCEEDED" in r.getMessage()] == ["INFO"]


@pytest.mark.timeout(120)
def test_the_notice_says_when_the_code_changed_since_the_stored_result(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(NOTICE_JOB)
    store = str(tmp_path / "store")
    first = subprocess.run([sys.executable, str(script), store], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and first.stdout.strip() == "1", first.stderr
    same = subprocess.run([sys.executable, str(script), store], capture_output=True, text=True, timeout=60)
    assert same.stdout.strip() == "1" and "already SUCCEEDED" in same.stderr and "CHANGED" not in same.stderr
    script.write_text(NOTICE_JOB.replace("ANSWER = 1", "ANSWER = 2"))  # a helper changed, not the handler
    changed = subprocess.run([sys.executable, str(script), store], capture_output=True, text=True, timeout=60)
    assert changed.stdout.strip() == "1"  # still the stored result ...
    assert "code CHANGED since that run" in changed.stderr and "durable-mp delete" in changed.stderr  # ... said so


@pytest.mark.timeout(180)
def test_fix_and_resume_reaches_a_failed_item_of_a_nested_map(store_path, tmp_path):
    flag = tmp_path / "broken"
    flag.touch()
    marks = tmp_path / "marks"
    marks.mkdir()

    def leaf(ctx, x, index, items):
        open(os.path.join(marks, f"{x}-{time.time()}"), "w").close()
        if x == 7 and flag.exists():
            raise ValueError("leaf 7 is broken")
        return x

    def outer(ctx, group, index, groups):
        inner = ctx.map(group, leaf, name=f"inner-{index}")
        inner.throw_if_error()
        return sum(inner.get_results())

    @durable_execution
    def handler(event, ctx):
        result = ctx.map([[0, 1, 2, 3], [4, 5, 6, 7]], outer, name="outer")
        result.throw_if_error()
        return result.get_results()

    with pytest.raises(ExecutionFailedError, match="leaf 7 is broken"):
        handler.run(None, store=store_path, execution_id="nested", max_workers=2)
    before = {name.split("-")[0] for name in os.listdir(marks)}
    assert "7" in before
    flag.unlink()
    assert handler.run(None, store=store_path, execution_id="nested", max_workers=2) == [6, 22]
    ran = [name.split("-")[0] for name in os.listdir(marks)]
    assert ran.count("7") == 2
    assert all(ran.count(x) == 1 for x in before - {"7"})  # the finished leaves replayed


def test_a_failed_execution_being_resumed_by_a_live_driver_is_locked():
    """Two drivers running a FAILED execution again would both reopen and run it."""
    import psutil

    from durable_mp.exceptions import ExecutionLockedError
    from durable_mp.store.records import ExecutionRecord, claim, this_process

    parent = psutil.Process(os.getppid())
    other = (parent.pid, parent.create_time())  # a live process that is not this one
    rec = ExecutionRecord("x", "FAILED", "m:h", None, None, {"ErrorMessage": "m"}, 0.0, 0.0, 1.0,
                          other[0], other[1], 1)
    with pytest.raises(ExecutionLockedError):
        claim(rec, this_process(), time.time())
    released = rec._replace(owner_pid=0, owner_create_time=0.0)
    assert claim(released, this_process(), time.time()).owner_pid == os.getpid()
    assert claim(rec._replace(status="SUCCEEDED"), this_process(), time.time()).owner_pid == os.getpid()


def test_finished_execution_returns_stored_result_without_running(store_path, tmp_path):
    marker = tmp_path / "ran"

    @durable_execution
    def handler(event, ctx):
        with open(marker, "a") as f:
            f.write("handler\n")
        return ctx.map([1, 2, 3], lambda c, x, i, xs: x * 10).get_results()

    assert run_skip_time(handler, store_path, {"k": 1}) == [10, 20, 30]
    assert run_skip_time(handler, store_path, {"k": 1}) == [10, 20, 30]
    assert marker.read_text().count("handler") == 1
    assert run_skip_time(handler, store_path, {"k": 2}) == [10, 20, 30]  # another event, another execution
    assert marker.read_text().count("handler") == 2


@pytest.mark.process_free
def test_is_replaying_and_logger_suppression(store_path, tmp_path, caplog):
    import logging
    seen = []

    @durable_execution
    def handler(event, ctx):
        seen.append(ctx.is_replaying())
        ctx.logger.info("before step")
        ctx.step(lambda _: 1, name="a")
        seen.append(ctx.is_replaying())
        if len(seen) == 2:
            raise KeyboardInterrupt
        return "ok"

    with caplog.at_level(logging.INFO, logger="durable_mp"):
        with pytest.raises(KeyboardInterrupt):
            run_skip_time(handler, store_path, execution_id="rp")
        first = [r for r in caplog.records if r.getMessage() == "before step"]
        assert run_skip_time(handler, store_path, execution_id="rp") == "ok"
        second = [r for r in caplog.records if r.getMessage() == "before step"]
    assert seen == [False, False, True, False]
    assert len(first) == 1 and len(second) == 1, "the replayed log line must be suppressed"
    assert first[0].executionArn == "rp"
