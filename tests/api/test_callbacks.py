"""Callbacks completed by another party while the execution waits, at the root and in a branch."""

from __future__ import annotations

import json
import threading
import time

import pytest

from durable_mp import durable_execution
from durable_mp.core.callback_ids import encode_callback_id
from durable_mp.core.records import OpRecord, OpStatus, OpType
from durable_mp.operation.callback import send_callback_failure, send_callback_heartbeat, send_callback_success
from durable_mp.config import CallbackConfig, CompletionConfig, Duration, ParallelConfig, WaitForCallbackConfig
from durable_mp.exceptions import CallbackExternalError, CallbackTimeoutError, ValidationError
from durable_mp.lambda_service import ErrorObject
from durable_mp.store.callbacks import poll_callback
from durable_mp.store.facade import Store
from util import run_cli

pytestmark = pytest.mark.timeout(60)


def answer_when_asked(id_file, store, respond):
    def run():
        deadline = time.monotonic() + 30
        while not id_file.exists() or not id_file.read_text():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        respond(id_file.read_text(), store)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.process_free
def test_wait_for_callback_at_the_root_gets_the_senders_payload(store_path, tmp_path):
    id_file = tmp_path / "cid"

    @durable_execution
    def handler(event, ctx):
        def submit(callback_id, cb_ctx):
            id_file.write_text(callback_id)
        return ctx.wait_for_callback(submit, name="approval")

    thread = answer_when_asked(id_file, store_path, lambda cid, st: send_callback_success(
        cid, json.dumps({"approved": True}).encode(), store=st))
    assert handler.run(None, store=store_path) == '{"approved": true}'
    thread.join()
    # a finished execution replays the callback without waiting for anyone
    assert handler.run(None, store=store_path) == '{"approved": true}'
    from durable_mp.store.facade import Store
    with Store(store_path) as st:
        names = {r.name: (r.op_type, r.sub_type, r.status) for r in st.ops(handler.execution_id_for(None))}
    assert names["approval"] == ("CONTEXT", "WaitForCallback", "SUCCEEDED")
    assert names["approval create callback id"] == ("CALLBACK", "Callback", "SUCCEEDED")
    assert names["approval submitter"] == ("STEP", "Step", "SUCCEEDED")


def test_create_callback_inside_a_branch_waits_through_the_driver(store_path, tmp_path):
    id_file = tmp_path / "cid"

    @durable_execution
    def handler(event, ctx):
        def branch(c):
            cb = c.create_callback(name="job-done")
            c.step(lambda _: id_file.write_text(cb.callback_id), name="submit")
            return cb.result()
        return ctx.parallel([branch, lambda c: "other"]).get_results()

    thread = answer_when_asked(id_file, store_path, lambda cid, st: send_callback_success(cid, b"42", store=st))
    assert handler.run(None, store=store_path) == ["42", "other"]
    thread.join()


def test_callback_failure_and_timeout(store_path, tmp_path):
    id_file = tmp_path / "cid"

    @durable_execution
    def handler(event, ctx):
        out = {}
        cb = ctx.create_callback(name="fails")
        id_file.write_text(cb.callback_id)
        try:
            cb.result()
        except CallbackExternalError as exc:
            out["failure"] = (exc.message, exc.error_type)
        slow = ctx.create_callback(name="nobody", config=CallbackConfig(timeout=Duration.from_seconds(1)))
        try:
            slow.result()
        except CallbackTimeoutError:
            out["timeout"] = True
        r = ctx.parallel([lambda c: c.wait_for_callback(lambda cid, _: None, name="in-branch",
                                                        config=WaitForCallbackConfig(timeout=Duration(1)))],
                         config=ParallelConfig(completion_config=CompletionConfig.all_completed()))
        out["branch"] = r.all[0].error.type
        return out

    thread = answer_when_asked(id_file, store_path, lambda cid, st: send_callback_failure(
        cid, ErrorObject("rejected by reviewer", "Rejected", None, None), store=st))
    out = handler.run(None, store=store_path)
    thread.join()
    assert out["failure"] == ("rejected by reviewer", "Rejected")
    assert out["timeout"] is True
    assert out["branch"].endswith("CallbackTimeoutError")


JOB = '''
import sys
from durable_mp import durable_execution

@durable_execution
def handler(event, ctx):
    def submit(callback_id, cb_ctx):
        with open(sys.argv[2], "w") as f:
            f.write(callback_id)
    return ctx.wait_for_callback(submit, name="approval")

if __name__ == "__main__":
    print(handler.run({}, store=sys.argv[1], execution_id="cb"), flush=True)
'''


def test_cli_completes_a_callback_of_a_running_execution(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(JOB)
    id_file = tmp_path / "cid"
    store = str(tmp_path / "store")
    proc = subprocess.Popen([sys.executable, str(script), store, str(id_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (id_file.exists() and id_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
        bad = subprocess.run([sys.executable, "-m", "durable_mp", "--store", store, "callback", "nonsense",
                              "--success", "x"], capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and "not a durable_mp callback id" in bad.stderr
        ok = subprocess.run([sys.executable, "-m", "durable_mp", "--store", store, "callback", id_file.read_text(),
                             "--success", '{"approved": true}'], capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.strip() == '{"approved": true}'
        again = subprocess.run([sys.executable, "-m", "durable_mp", "--store", store, "callback",
                                id_file.read_text(), "--success", "late"], capture_output=True, text=True, timeout=30)
        assert again.returncode == 2 and "already SUCCEEDED" in again.stderr
    finally:
        proc.kill()
        proc.wait()


SILENT_JOB = '''
import json
import sys
from durable_mp import durable_execution
from durable_mp.config import CallbackConfig, Duration

@durable_execution
def handler(event, ctx):
    cb = ctx.create_callback(name="approval", config=CallbackConfig(
        timeout=Duration.from_seconds(120), heartbeat_timeout=Duration.from_seconds(60)))
    return {"got": cb.result()}

if __name__ == "__main__":
    print(json.dumps(handler.run({}, store=sys.argv[1], execution_id="outside")), flush=True)
'''


def test_an_outside_system_finds_the_callback_id_and_succeeds_it_without_a_result(tmp_path):
    """The handler tells nobody the id: list, show and history must; --success alone gives None."""
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(SILENT_JOB)
    store = str(tmp_path / "store")
    proc = subprocess.Popen([sys.executable, str(script), store], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        rows: list = []
        while time.monotonic() < deadline:
            listed = run_cli("list", "--json", store=store, timeout=30)
            rows = json.loads(listed.stdout) if listed.returncode == 0 and listed.stdout.strip() else []
            if rows and rows[0]["waiting_callbacks"]:
                break
            time.sleep(0.05)
        [waiting] = rows[0]["waiting_callbacks"]
        assert waiting["name"] == "approval"
        cid = waiting["id"]
        assert f"waiting for callback 'approval': {cid}" in run_cli("list", store=store, timeout=30).stdout
        assert f"callback id {cid}" in run_cli("show", "outside", store=store, timeout=30).stdout
        events = json.loads(run_cli("history", "outside", "--json", store=store, timeout=30).stdout)
        started = next(e for e in events if e["EventType"] == "CallbackStarted")
        assert started["CallbackStartedDetails"] == {"CallbackId": cid, "Timeout": 120, "HeartbeatTimeout": 60}
        ok = run_cli("callback", cid, "--success", store=store, timeout=30)
        assert ok.returncode == 0, ok.stderr
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert json.loads(out) == {"got": None}
        assert json.loads(run_cli("list", "--json", store=store, timeout=30).stdout)[0]["waiting_callbacks"] == []
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.process_free
@pytest.mark.parametrize("empty", [b"", "", None])
def test_an_empty_success_gives_none(store_path, tmp_path, empty):
    id_file = tmp_path / "cid"

    @durable_execution
    def handler(event, ctx):
        cb = ctx.create_callback(name="empty")
        id_file.write_text(cb.callback_id)
        return [cb.result()]

    thread = answer_when_asked(id_file, store_path, lambda cid, st: send_callback_success(cid, empty, store=st))
    assert handler.run(None, store=store_path, execution_id=f"empty-{empty!r}") == [None]
    thread.join()


@pytest.mark.process_free
def test_a_timed_out_callback_is_timed_out_with_the_references_error(store_path):
    from durable_mp.core.records import OpStatus
    from durable_mp.inspect.history import build_history
    from durable_mp.store.facade import Store

    @durable_execution
    def handler(event, ctx):
        cb = ctx.create_callback(name="late", config=CallbackConfig(timeout=Duration.from_seconds(1)))
        try:
            cb.result()
        except CallbackTimeoutError as exc:
            return [type(exc).__name__, str(exc), exc.error_type]
        return "no timeout"

    assert handler.run(None, store=store_path, execution_id="late") == [
        "CallbackTimeoutError", "Callback timed out", "Callback.Timeout"]
    with Store(store_path) as store:
        [rec] = store.ops("late")
        events = build_history(store.get_execution("late"), store.ops("late"))
    assert rec.status == OpStatus.TIMED_OUT
    assert rec.error == {"ErrorMessage": "Callback timed out", "ErrorType": "Callback.Timeout"}
    timed_out = [e for e in events if e.event_type.startswith("Callback") and e.event_type != "CallbackStarted"]
    assert [e.event_type for e in timed_out] == ["CallbackTimedOut"]
    assert timed_out[0].details["Error"]["Payload"]["ErrorType"] == "Callback.Timeout"


# -- completions from outside are compare-and-set (issue 18 defect 3) ----------------------------------
def _started_callback(store_path: str, exec_id: str, **extra) -> str:
    """A STARTED callback record committed in the store, as ``create_callback`` leaves it; its id."""
    with Store(store_path) as st:
        rec = OpRecord("c" * 64, "", OpType.CALLBACK, "Callback", "approval", OpStatus.STARTED, time.time(),
                       extra={"deadline": None, "heartbeat_timeout": 3600, **extra})
        st.stage(exec_id, rec)
    return encode_callback_id(exec_id, "", "c" * 64)


def _stored(store_path: str, exec_id: str) -> OpRecord:
    with Store(store_path) as st:
        rec = st.get_op(exec_id, "", "c" * 64)
    assert rec is not None
    return rec


def _race_heartbeats_and_success(store_path: str, exec_id: str, trial: int, shared: Store | None) -> None:
    callback_id = _started_callback(store_path, exec_id)
    start = threading.Barrier(4)
    acked = []

    def heartbeat():
        start.wait()
        for _ in range(15):
            try:
                send_callback_heartbeat(callback_id, store=shared or store_path)
            except ValidationError:
                return  # refused: the callback is complete

    def succeed():
        start.wait()
        time.sleep(0.002 * (trial % 4))
        send_callback_success(callback_id, f"ok {trial}", store=shared or store_path)
        acked.append(True)

    threads = [threading.Thread(target=heartbeat) for _ in range(3)] + [threading.Thread(target=succeed)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert acked == [True]


@pytest.mark.parametrize("store_kind", ["shared", "own"])
def test_an_acknowledged_success_is_never_overwritten_by_a_concurrent_heartbeat(store_path, store_kind):
    """Heartbeats race a success, each sender with its own store handle (a process of its own) or one
    shared handle: once ``send_callback_success`` returned, the callback is SUCCEEDED with its result."""
    for trial in range(12):
        exec_id = f"cas-{trial}"
        shared = Store(store_path) if store_kind == "shared" else None
        try:
            _race_heartbeats_and_success(store_path, exec_id, trial, shared)
        finally:
            if shared is not None:
                shared.close()
        rec = _stored(store_path, exec_id)
        assert (rec.status, rec.result) == (OpStatus.SUCCEEDED, f"ok {trial}"), f"trial {trial}: the success was lost"


def _race_timeout_and_success(store_path: str, exec_id: str) -> dict:
    callback_id = _started_callback(store_path, exec_id, heartbeat=time.time() - 7200)  # overdue
    outcome: dict = {}
    start = threading.Barrier(2)
    with Store(store_path) as driver_store:
        stale = driver_store.get_op(exec_id, "", "c" * 64)

        def driver():
            start.wait()
            outcome["driver"] = poll_callback(driver_store, exec_id, stale)

        def sender():
            start.wait()
            try:
                send_callback_success(callback_id, "late?", store=store_path)
                outcome["sender"] = "acked"
            except ValidationError as exc:
                outcome["sender"] = str(exc)

        threads = [threading.Thread(target=driver), threading.Thread(target=sender)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    return outcome


def test_the_drivers_timeout_and_a_success_never_both_win(store_path):
    """The driver times the callback out while a sender succeeds it: exactly one of them is recorded,
    and the one that lost is told (the sender by an error, the driver by the record it gets back)."""
    for trial in range(12):
        exec_id = f"race-{trial}"
        outcome = _race_timeout_and_success(store_path, exec_id)
        rec = _stored(store_path, exec_id)
        assert outcome["driver"] is not None and outcome["driver"].status == rec.status
        if outcome["sender"] == "acked":
            assert (rec.status, rec.result) == (OpStatus.SUCCEEDED, "late?")
        else:
            assert rec.status == OpStatus.TIMED_OUT and "already TIMED_OUT" in outcome["sender"]


def test_a_completion_after_the_timeout_is_refused_with_a_clear_error(store_path):
    callback_id = _started_callback(store_path, "late", heartbeat=time.time() - 7200)
    with Store(store_path) as st:
        done = poll_callback(st, "late", st.get_op("late", "", "c" * 64))
    assert done is not None and done.status == OpStatus.TIMED_OUT
    with pytest.raises(ValidationError, match="'approval' is already TIMED_OUT"):
        send_callback_success(callback_id, "too late", store=store_path)
    with pytest.raises(ValidationError, match="already TIMED_OUT"):
        send_callback_heartbeat(callback_id, store=store_path)
    assert _stored(store_path, "late").status == OpStatus.TIMED_OUT


# -- a callback wait does not hold the worker's send lock ------------------------------
@pytest.mark.timeout(120)
def test_a_waiting_callback_does_not_stall_sibling_nested_branches(store_path, tmp_path):
    from durable_mp.operation.callback import send_callback_success

    done = tmp_path / "sibling-done"

    def waiter(ctx):
        cb = ctx.create_callback(name="approval")
        (tmp_path / "cbid").write_text(cb.callback_id)
        return cb.result()

    def sibling(ctx):
        while not (tmp_path / "cbid").exists():  # start once the waiter is about to block on its callback
            time.sleep(0.01)
        time.sleep(0.3)
        for k in range(5):
            ctx.step(lambda s, k=k: time.sleep(0.02) or k, name=f"s{k}")  # each record goes out on its own
        done.write_text("")
        return "sibling"

    def item(ctx, x, i, xs):
        r = ctx.parallel([waiter, sibling],
                         config=ParallelConfig(completion_config=CompletionConfig.all_completed()))
        return r.get_results()

    @durable_execution
    def handler(event, ctx):
        return ctx.map([0], item).get_results()

    seen = {}

    def complete_after_sibling():
        deadline = time.monotonic() + 30  # a stalled sibling: the callback is completed anyway, after this
        while time.monotonic() < deadline and not (done.exists() and (tmp_path / "cbid").exists()):
            time.sleep(0.05)
        seen["sibling_finished_while_waiting"] = done.exists()
        send_callback_success((tmp_path / "cbid").read_text(), b'"yes"', store=store_path)

    t = threading.Thread(target=complete_after_sibling, daemon=True)
    t.start()
    result = handler.run(None, store=store_path)
    t.join(5)
    assert seen["sibling_finished_while_waiting"], "the sibling stalled while the callback waited"
    assert result[0][1] == "sibling"
