"""``python -m durable_mp``: every command on real executions, in a temporary store.

Handlers live in files written into ``tmp_path`` and are named by ``path.py:handler``
refs, the way a user points the CLI at a script.  Commands run as subprocesses where the
process boundary matters (exit codes, SIGKILL, logging from workers) and in-process via
``cli.main`` elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import durable_mp.cli.main as cli
from durable_mp.store.facade import Store
from durable_mp.store.records import RUNNING, ExecutionRecord
from util import run_cli, wait_until

JOBS = textwrap.dedent(
    """
    import os, time
    from durable_mp import durable_execution
    from durable_mp.config import Duration, ParallelConfig, StepConfig

    def square(i):
        def run(ctx):
            def work(sc):
                sc.logger.info("step in worker %d", os.getpid())
                return i * i
            return ctx.step(work, name=f"square-{i}")
        return run

    @durable_execution
    def ok(event, ctx):
        event = event or {}
        ctx.logger.info("handler says hello to %s", event.get("who", "nobody"))
        r = ctx.parallel([square(i) for i in range(event.get("n", 3))], name="squares")
        return r.get_results()

    @durable_execution
    def boom(event, ctx):
        ctx.step(lambda sc: 1, name="fine")
        raise ValueError("boom")

    @durable_execution
    def batch(event, ctx):
        return ctx.map(list(range(event["n"])), lambda c, x, i, xs: x, name="items")

    @durable_execution
    def unjsonable(event, ctx):
        return {1, 2}

    @durable_execution
    def big(event, ctx):
        return ctx.map(list(range(event["n"])), lambda c, x, i, xs: b"x" * 4096, name="blobs").success_count

    def slow_branch(i, markers, pause, hold=None):
        def run(ctx):
            first = ctx.step(lambda sc: i, name=f"first-{i}")
            def second(sc):
                if hold:  # held until the test lets go (a loaded machine must not end it early)
                    deadline = time.time() + 60
                    while not os.path.exists(hold) and time.time() < deadline:
                        time.sleep(0.05)
                else:
                    time.sleep(pause)
                open(os.path.join(markers, f"done-{i}"), "w").close()
                return first + 100
            # a step with a timeout is watched by the driver, so the checkpoint of
            # `first` reaches the store before `second` starts
            return ctx.step(second, name=f"second-{i}", config=StepConfig(timeout=Duration.from_seconds(30)))
        return run

    @durable_execution
    def slow(event, ctx):
        r = ctx.parallel([slow_branch(i, event["markers"], event.get("pause", 0.4), event.get("hold"))
                          for i in range(event["n"])], name="slow",
                         config=ParallelConfig(max_concurrency=3))
        return r.get_results()

    not_a_handler = 42
    """
)


@pytest.fixture
def jobs(tmp_path):
    """Path of a fresh handler module with a unique module name."""
    path = tmp_path / f"jobs_{uuid.uuid4().hex[:10]}.py"
    path.write_text(JOBS)
    return str(path)


def in_process(capsys, *args, store):
    code = cli.main([*args, "--store", str(store)])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line message, got: {text!r}"
    assert "Traceback" not in text
    return lines[0]


@pytest.mark.timeout(60)
def test_run_list_show_history_on_a_successful_execution(jobs, store_path, capsys):
    proc = run_cli("run", f"{jobs}:ok", "--id", "good", "--input", '{"n": 3}', store=store_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [0, 1, 4]

    code, out, _ = in_process(capsys, "list", store=store_path)
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split() == ["ID", "HANDLER", "STATUS", "STARTED", "DURATION", "OPS"]
    module = os.path.basename(jobs)[:-3]
    assert row.split()[:3] == ["good", f"{module}:ok", "SUCCEEDED"]
    assert row.split()[-1] == "7/7"  # 1 parallel + 3 branches + 3 steps

    code, out, _ = in_process(capsys, "list", "--json", store=store_path)
    (entry,) = json.loads(out)
    assert entry["status"] == "SUCCEEDED" and entry["ops_done"] == entry["ops_total"] == 7 and entry["runs"] == 1

    code, out, _ = in_process(capsys, "show", "good", store=store_path)
    assert code == 0
    assert "Parallel squares  SUCCEEDED" in out
    for i in range(3):
        assert f"[{i}] ParallelBranch parallel-branch-{i}  SUCCEEDED" in out
        assert f"Step square-{i}  SUCCEEDED" in out
    assert "1 attempt" in out

    code, out, _ = in_process(capsys, "history", "good", "--json", store=store_path)
    events = json.loads(out)
    assert [e["EventId"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["EventType"] == "ExecutionStarted" and events[-1]["EventType"] == "ExecutionSucceeded"
    code, out, _ = in_process(capsys, "history", "good", store=store_path)
    assert code == 0 and "ContextStarted" in out and "StepSucceeded" in out

    # running the same id again returns the stored result without running anything
    again = run_cli("run", f"{jobs}:ok", "--id", "good", "--input", '{"n": 3}', store=store_path)
    assert again.returncode == 0 and json.loads(again.stdout) == [0, 1, 4]


@pytest.mark.timeout(60)
def test_failed_execution_exits_1_and_is_shown(jobs, store_path, capsys):
    proc = run_cli("run", f"{jobs}:boom", "--id", "bad", store=store_path)
    assert proc.returncode == 1
    assert "ValueError: boom" in one_line(proc.stderr)
    assert proc.stdout == ""

    code, out, _ = in_process(capsys, "list", "--status", "failed", store=store_path)
    assert code == 0 and "bad" in out and "FAILED" in out
    code, out, err = in_process(capsys, "list", "--status", "SUCCEEDED", store=store_path)
    assert code == 0 and "bad" not in out

    code, out, _ = in_process(capsys, "show", "bad", store=store_path)
    assert "execution bad  FAILED" in out and "error: ValueError: boom" in out

    code, out, _ = in_process(capsys, "history", "bad", "--json", store=store_path)
    last = json.loads(out)[-1]
    assert last["EventType"] == "ExecutionFailed"
    assert last["ExecutionFailedDetails"]["Error"]["Payload"]["ErrorType"] == "ValueError"

    # resume --no-resume-failed of a failed execution reports its stored outcome (the reference's rule)
    code, out, err = in_process(capsys, "resume", "bad", "--no-resume-failed", store=store_path)
    assert code == 1 and "ValueError: boom" in one_line(err)


def test_bad_id_and_bad_store_exit_2_with_one_line(tmp_path, store_path, capsys):
    Store(store_path).close()  # an empty, valid store
    for command in (["show", "nope"], ["history", "nope"], ["report", "nope", "-o", str(tmp_path / "r.html")],
                    ["resume", "nope"], ["delete", "nope"]):
        code, out, err = in_process(capsys, *command, store=store_path)
        assert code == 2, command
        assert "no execution 'nope'" in one_line(err)
        assert out == ""
    code, _, err = in_process(capsys, "show", "bad\x01id", store=store_path)
    assert code == 2 and "control character" in one_line(err)

    missing = tmp_path / "no-such-store"
    code, _, err = in_process(capsys, "list", store=missing)
    assert code == 2 and "no durable_mp store" in one_line(err)
    assert not missing.exists(), "read-only commands must not create a store"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = in_process(capsys, "show", "x", store=a_file)
    assert code == 2 and "not a directory" in one_line(err)
    proc = run_cli("list", store=missing)
    assert proc.returncode == 2 and "no durable_mp store" in one_line(proc.stderr)


def test_usage_errors_exit_2_with_one_line(jobs, tmp_path, store_path, capsys):
    code, _, err = in_process(capsys, "run", f"{jobs}:ok", "--input", "{not json", store=store_path)
    assert code == 2 and "--input is not valid JSON" in one_line(err)
    code, _, err = in_process(capsys, "run", f"{jobs}:ok", "--input-file", str(tmp_path / "none.json"),
                              store=store_path)
    assert code == 2 and "cannot read --input-file" in one_line(err)
    code, _, err = in_process(capsys, "run", "no_such_module_xyz:handler", store=store_path)
    assert code == 2 and "no module named 'no_such_module_xyz'" in one_line(err)
    code, _, err = in_process(capsys, "run", f"{jobs}:missing", store=store_path)
    assert code == 2 and "has no attribute 'missing'" in one_line(err)
    code, _, err = in_process(capsys, "run", f"{jobs}:not_a_handler", store=store_path)
    assert code == 2 and "not a handler decorated with @durable_execution" in one_line(err)
    code, _, err = in_process(capsys, "run", str(tmp_path / "nope.py") + ":h", store=store_path)
    assert code == 2 and "no such file" in one_line(err)
    code, _, err = in_process(capsys, "gc", "--older-than", "soon", store=store_path)
    assert code == 2 and "bad duration" in one_line(err)
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", f"{jobs}:ok", "--max-workers", "0"])
    assert exc.value.code == 2


@pytest.mark.parametrize("command", ["run", "resume", "list", "show", "history", "report", "delete", "gc"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert "--store" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_results_that_are_not_json(jobs, store_path, capsys):
    code, out, _ = in_process(capsys, "run", f"{jobs}:unjsonable", "--id", "set", store=store_path)
    assert code == 0 and out.strip() == "{1, 2}"
    code, out, _ = in_process(capsys, "run", f"{jobs}:batch", "--id", "br", "--input", '{"n": 3}',
                              store=store_path)
    assert code == 0
    result = json.loads(out)  # a BatchResult, printed through its to_dict()
    assert [item["result"] for item in result["all"]] == [0, 1, 2]


@pytest.mark.timeout(60)
def test_show_summarizes_large_maps(jobs, store_path, capsys):
    code, _, _ = in_process(capsys, "run", f"{jobs}:batch", "--id", "many", "--input", '{"n": 300}',
                            store=store_path)
    assert code == 0
    code, out, _ = in_process(capsys, "show", "many", "--limit", "6", store=store_path)
    lines = out.splitlines()
    assert any("[0] MapIteration map-item-0" in l for l in lines)
    assert any("[299] MapIteration map-item-299" in l for l in lines)
    assert not any("[150] MapIteration" in l for l in lines)
    assert any("… 294 more: 294 SUCCEEDED" in l for l in lines)
    assert len(lines) < 15
    code, out, _ = in_process(capsys, "show", "many", "--all", store=store_path)
    assert "[150] MapIteration map-item-150" in out


@pytest.mark.timeout(60)
def test_log_level_shows_handler_and_worker_logs(jobs, store_path):
    proc = run_cli("run", f"{jobs}:ok", "--id", "logs", "--input", '{"who": "tester"}', "--log-level", "INFO",
                   store=store_path)
    assert proc.returncode == 0, proc.stderr
    handler_lines = [l for l in proc.stderr.splitlines() if "handler says hello to tester" in l]
    worker_lines = [l for l in proc.stderr.splitlines() if "step in worker" in l]
    assert len(handler_lines) == 1 and len(worker_lines) == 3
    driver_pid = handler_lines[0].split("[pid ")[1].split("]")[0]
    for line in worker_lines:  # forwarded from the workers, formatted by the driver with their pid
        assert line.split("[pid ")[1].split("]")[0] == line.rsplit(" ", 1)[1] != driver_pid
    quiet = run_cli("run", f"{jobs}:ok", "--id", "quiet", store=store_path)
    assert "handler says hello" not in quiet.stderr


@pytest.mark.timeout(60)
def test_progress_flag(jobs, store_path):
    shown = run_cli("run", f"{jobs}:ok", "--id", "bar", "--input", '{"n": 4}', "--progress", store=store_path)
    assert shown.returncode == 0 and "squares" in shown.stderr and "4/4" in shown.stderr
    hidden = run_cli("run", f"{jobs}:ok", "--id", "nobar", "--input", '{"n": 4}', "--no-progress",
                     store=store_path)
    assert hidden.returncode == 0 and "4/4" not in hidden.stderr


@pytest.mark.timeout(60)
def test_sigkilled_run_is_resumed_and_reported(jobs, tmp_path, store_path, capsys):
    markers = tmp_path / "markers"
    markers.mkdir()
    event = json.dumps({"n": 9, "markers": str(markers)})
    proc = subprocess.Popen([sys.executable, "-m", "durable_mp", "run", f"{jobs}:slow", "--id", "crashy",
                             "--input", event, "--store", store_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert wait_until(lambda: len(os.listdir(markers)) >= 3, 30.0), "timed out waiting"
        time.sleep(0.15)  # the next branches have started and checkpointed their first step
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # driver and workers, like a power cut
        proc.communicate(timeout=30)
    assert len(os.listdir(markers)) < 9, "the kill must land mid-run"

    code, out, _ = in_process(capsys, "list", "--status", "INTERRUPTED", store=store_path)
    assert code == 0 and "crashy" in out and "INTERRUPTED" in out
    code, out, _ = in_process(capsys, "show", "crashy", store=store_path)
    assert "Parallel slow  STARTED  interrupted" in out

    # resume from another directory: the handler's file was recorded with the execution
    other = tmp_path / "elsewhere"
    other.mkdir()
    resumed = run_cli("resume", "crashy", store=store_path, cwd=str(other))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == [100 + i for i in range(9)]

    code, out, _ = in_process(capsys, "list", "--json", store=store_path)
    (entry,) = json.loads(out)
    assert entry["status"] == "SUCCEEDED" and entry["runs"] == 2

    report = tmp_path / "crashy.html"
    code, _, err = in_process(capsys, "report", "crashy", "-o", str(report), store=store_path)
    assert code == 0 and "wrote" in err
    html = report.read_text()
    assert html.count('data-kind="branch"') == 9
    assert 'data-redispatched="1"' in html, "branches cut by the kill were re-dispatched to new workers"
    assert 'data-kind="stopped"' in html and 'data-run="2"' in html
    assert 'data-kind="crash"' not in html, "the workers stopped with their driver: no worker crashed"

    code, out, _ = in_process(capsys, "history", "crashy", "--json", store=store_path)
    events = json.loads(out)
    assert sum(e["EventType"] == "ContextSucceeded" and e["SubType"] == "ParallelBranch" for e in events) == 9
    assert events[-1]["EventType"] == "ExecutionSucceeded"


@pytest.mark.timeout(60)
def test_locked_execution_cannot_be_resumed_or_deleted(jobs, tmp_path, store_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    hold = tmp_path / "let-go"
    event = json.dumps({"n": 3, "markers": str(markers), "hold": str(hold)})
    proc = subprocess.Popen([sys.executable, "-m", "durable_mp", "run", f"{jobs}:slow", "--id", "busy",
                             "--input", event, "--store", store_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: os.path.exists(os.path.join(store_path, "data.mdb")) and "busy" in
                          run_cli("list", store=store_path).stdout, 30.0), "timed out waiting"
        second = run_cli("resume", "busy", store=store_path)
        assert second.returncode == 2 and "another live driver" in one_line(second.stderr)
        gone = run_cli("delete", "busy", store=store_path)
        assert gone.returncode == 2 and "is running" in one_line(gone.stderr)
    finally:
        hold.write_text("")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out) == [100, 101, 102]


def test_resume_with_an_unimportable_handler_exits_2(store_path, capsys):
    with Store(store_path) as st:
        now = time.time()
        st.acquire("orphan", lambda: ExecutionRecord("orphan", RUNNING, "no_such_module_xyz:handler", None, None,
                                                     None, now, now, None, 0, 0.0, 1))
        st.release("orphan")
    code, out, err = in_process(capsys, "resume", "orphan", store=store_path)
    assert code == 2 and out == ""
    assert "cannot resume 'orphan'" in one_line(err) and "no_such_module_xyz" in err
    with Store(store_path) as st:
        st.acquire("script", lambda: ExecutionRecord("script", RUNNING, "__main__:handler", None, None,
                                                     None, now, now, None, 0, 0.0, 1))
        st.release("script")
    code, out, err = in_process(capsys, "resume", "script", store=store_path)
    assert code == 2 and "--handler path/to/script.py:handler" in one_line(err)


@pytest.mark.timeout(60)
def test_resume_with_a_handler_override(jobs, store_path, capsys):
    with Store(store_path) as st:
        now = time.time()
        st.acquire("moved", lambda: ExecutionRecord("moved", RUNNING, "__main__:ok", None, None, None, now, now,
                                                    None, 0, 0.0, 1))
        st.release("moved")
    code, out, err = in_process(capsys, "resume", "moved", "--handler", f"{jobs}:ok", store=store_path)
    assert code == 0, err
    assert json.loads(out) == [0, 1, 4]  # the recorded input was None: the handler's defaults


@pytest.mark.timeout(60)
def test_delete_gc_and_compact(jobs, store_path, capsys):
    for name in ("one", "two"):
        assert in_process(capsys, "run", f"{jobs}:ok", "--id", name, store=store_path)[0] == 0
    code, _, err = in_process(capsys, "delete", "one", store=store_path)
    assert code == 0 and "deleted execution one (7 operation records)" in err
    code, out, _ = in_process(capsys, "list", "--json", store=store_path)
    assert [e["id"] for e in json.loads(out)] == ["two"]

    with Store(store_path) as st:  # an interrupted execution is kept unless forced
        now = time.time()
        st.acquire("half", lambda: ExecutionRecord("half", RUNNING, "x:y", None, None, None, now, now, None,
                                                   0, 0.0, 1))
        st.release("half")
    code, _, err = in_process(capsys, "delete", "half", store=store_path)
    assert code == 2 and "--force" in one_line(err)

    code, out, err = in_process(capsys, "gc", "--older-than", "7d", store=store_path)
    assert code == 0 and out == "" and "deleted 0 execution(s)" in err and "1 unfinished kept" in err
    code, out, err = in_process(capsys, "gc", "--older-than", "0s", "--dry-run", store=store_path)
    assert code == 0 and out.split() == ["two"] and "would delete 1" in err
    code, out, err = in_process(capsys, "gc", "--older-than", "0s", store=store_path)
    assert code == 0 and out.split() == ["two"]
    code, _, err = in_process(capsys, "delete", "half", "--force", store=store_path)
    assert code == 0
    code, out, _ = in_process(capsys, "list", "--json", store=store_path)
    assert json.loads(out) == []

    assert in_process(capsys, "run", f"{jobs}:big", "--id", "big", "--input", '{"n": 4000}',
                      store=store_path)[0] == 0
    size = os.path.getsize(os.path.join(store_path, "data.mdb"))
    assert size > 15 * 2**20
    code, _, err = in_process(capsys, "delete", "big", "--compact", store=store_path)
    assert code == 0 and "compacted" in err
    assert os.path.getsize(os.path.join(store_path, "data.mdb")) < size / 4
    # the compacted store still works
    assert in_process(capsys, "run", f"{jobs}:ok", "--id", "after", store=store_path)[0] == 0
    code, out, _ = in_process(capsys, "show", "after", store=store_path)
    assert "SUCCEEDED" in out


SCRIPT = '''
import os, sys, time
from durable_mp import durable_execution

@durable_execution
def handler(event, ctx):
    def item(c, x, i, xs):
        if not os.environ.get("FAST"):
            time.sleep(0.3)
        return x * 2
    return ctx.map(list(range(6)), item).get_results()

if __name__ == "__main__":
    print(handler.run({"k": 1}, store=sys.argv[1], execution_id="scripted"), flush=True)
'''


@pytest.mark.timeout(60)
def test_resume_finds_a_handler_from_a_script_run_with_plain_python(tmp_path):
    import signal

    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    store = str(tmp_path / "store")
    proc = subprocess.Popen([sys.executable, str(script), store], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    out = subprocess.run([sys.executable, "-m", "durable_mp", "--store", store, "resume", "scripted"],
                         capture_output=True, text=True, timeout=60, cwd=other_dir, env={**os.environ, "FAST": "1"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [0, 2, 4, 6, 8, 10]


FIXABLE = textwrap.dedent(
    """
    import os
    from durable_mp import durable_execution
    from durable_mp.config import StepConfig
    from durable_mp.retries import RetryPresets

    HERE = os.path.dirname(os.path.abspath(__file__))

    def item(ctx, x, index, items):
        def work(sc):
            open(os.path.join(HERE, "marks", f"{index}-{sc.attempt}"), "w").close()
            if index == 13 and os.path.exists(os.path.join(HERE, "broken")):
                raise ValueError("item 13 is broken")
            return x + 1
        return ctx.step(work, name="work", config=StepConfig(retry_strategy=RetryPresets.none()))

    @durable_execution(max_workers=2)
    def job(event, ctx):
        result = ctx.map(list(range(event["n"])), item, name="items")
        result.throw_if_error()
        return result.get_results()
    """
)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("again", ["run", "resume"])
def test_run_and_resume_of_a_failed_execution_run_only_what_failed(tmp_path, store_path, again):
    """Fix and resume from the command line: run, see item 13 fail, fix, run (or resume) again."""
    job = tmp_path / "fixable.py"
    job.write_text(FIXABLE)
    (tmp_path / "marks").mkdir()
    (tmp_path / "broken").touch()
    first = run_cli("run", f"{job}:job", "--id", "fixme", "--input", '{"n": 20}', store=store_path, timeout=120)
    assert first.returncode == 1 and "item 13 is broken" in first.stderr
    before = set(os.listdir(tmp_path / "marks"))
    assert "13-1" in before

    kept = run_cli(again, *([f"{job}:job", "--id", "fixme", "--input", '{"n": 20}'] if again == "run" else ["fixme"]),
                   "--no-resume-failed", store=store_path)
    assert kept.returncode == 1 and "item 13 is broken" in kept.stderr
    assert set(os.listdir(tmp_path / "marks")) == before  # nothing ran

    (tmp_path / "broken").unlink()  # the fix
    args = [f"{job}:job", "--id", "fixme", "--input", '{"n": 20}'] if again == "run" else ["fixme"]
    fixed = run_cli(again, *args, store=store_path, timeout=120)
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout) == [i + 1 for i in range(20)]
    assert "resuming it" in fixed.stderr
    new = set(os.listdir(tmp_path / "marks")) - before
    assert "13-2" in new and not any(name.split("-")[0] in {m.split("-")[0] for m in before} and name != "13-2"
                                     for name in new)  # only item 13 (and items never started) ran again
    with Store(store_path) as st:
        assert st.get_execution("fixme").status == "SUCCEEDED"
