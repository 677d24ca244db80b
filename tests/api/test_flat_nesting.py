"""NestingType.FLAT: branches run in virtual contexts, and still replay and resume (``core.nesting``).

Under FLAT a branch records no operation of its own: its operations hang off the batch,
with ids derived from the branch's id.  A re-dispatched or resumed branch must still get
exactly its own checkpoints, found by those ids.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from durable_mp import ExecutionFailedError, durable_execution
from durable_mp.exceptions import NonDeterministicExecutionError
from durable_mp.config import MapConfig, NestingType, ParallelConfig, StepConfig
from durable_mp.core.records import OpType, operation_id
from durable_mp.engine.worker import OUTBOX_FLUSH_SECONDS
from durable_mp.retries import RetryPresets
from durable_mp.store.facade import Store

pytestmark = pytest.mark.timeout(180)

BLOCKED_ITEM = 5
NO_RETRY = StepConfig(retry_strategy=RetryPresets.none())
JOB = textwrap.dedent(
    """
    import os, sys, time
    from durable_mp import durable_execution
    from durable_mp.config import MapConfig, NestingType

    MARKERS = sys.argv[2]

    def mark(kind, i):
        with open(os.path.join(MARKERS, f"{kind}-{i}"), "a") as f:
            f.write("x")

    def item(ctx, value, index, items):
        def work(step_ctx):
            mark("work", index)
            time.sleep(0.05)
            return value * value

        squared = ctx.step(work, name=f"work-{index}")

        def after(step_ctx):
            mark("after", index)
            while os.path.exists(os.path.join(MARKERS, f"block-{index}")):
                time.sleep(0.02)  # the driver is killed while this step runs
            return squared + 1

        return ctx.step(after, name=f"after-{index}")

    @durable_execution
    def handler(event, ctx):
        r = ctx.map(list(range(12)), item, name="flat-map",
                    config=MapConfig(max_concurrency=2, nesting_type=NestingType.FLAT))
        return r.get_results()

    if __name__ == "__main__":
        print(handler.run({"job": 1}, store=sys.argv[1], execution_id="flat-resume", start_method=sys.argv[3]))
    """
)


def _counts(markers, kind: str) -> dict[int, int]:
    out = {}
    for name in os.listdir(markers):
        if name.startswith(kind + "-"):
            out[int(name.split("-")[1])] = len(open(os.path.join(markers, name)).read())
    return out


def _assert_flat_records(store_path, exec_id: str, batch_name: str) -> list:
    """No branch operation is anyone's parent: every step of a branch hangs off the batch."""
    with Store(store_path) as st:
        ops = st.ops(exec_id)
    batch = next(r for r in ops if r.name == batch_name)
    steps = [r for r in ops if r.op_type == OpType.STEP]
    assert steps and all(r.parent_id == batch.op_id for r in steps), [(r.name, r.parent_id) for r in steps]
    branch_ids = {operation_id(batch.op_id, i) for i in range(64)}
    assert not any(r.parent_id in branch_ids for r in ops)
    return steps


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_sigkilled_driver_resumes_a_flat_map_and_a_cut_branch_replays_its_own_steps(tmp_path, start_method):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    markers = tmp_path / "markers"
    markers.mkdir()
    (markers / f"block-{BLOCKED_ITEM}").write_text("")
    store = tmp_path / "store"
    args = [sys.executable, str(script), str(store), str(markers), start_method]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 90
    while BLOCKED_ITEM not in _counts(markers, "after") and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # item 5's first step is committed (group commit: milliseconds)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, like a power cut
    proc.wait(timeout=30)
    assert BLOCKED_ITEM in _counts(markers, "after"), proc.stderr.read().decode()[-2000:]
    steps = _assert_flat_records(store, "flat-resume", "flat-map")
    committed = {r.name for r in steps if r.status == "SUCCEEDED"}
    assert f"work-{BLOCKED_ITEM}" in committed and f"after-{BLOCKED_ITEM}" not in committed

    (markers / f"block-{BLOCKED_ITEM}").unlink()
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str([i * i + 1 for i in range(12)])

    work, after = _counts(markers, "work"), _counts(markers, "after")
    assert sorted(work) == sorted(after) == list(range(12))
    for name in committed:  # a step checkpointed before the kill never runs again, in a finished or a cut branch
        kind, index = name.split("-")
        assert (work if kind == "work" else after)[int(index)] == 1, f"{name} ran again"
    assert after[BLOCKED_ITEM] == 2  # the cut branch ran again from its second step
    _assert_flat_records(store, "flat-resume", "flat-map")


def _flat_parallel_handler(markers, fail_flag):
    def branch(i):
        def run(ctx):
            def work(step_ctx):
                with open(os.path.join(markers, f"work-{i}"), "a") as f:
                    f.write("x")
                return i * 10

            first = ctx.step(work, name=f"work-{i}")
            return ctx.run_in_child_context(lambda c: c.step(lambda sc: first + 1, name=f"inner-{i}"), name=f"kid-{i}")
        return run

    def handler(event, ctx):
        batch = ctx.parallel([branch(i) for i in range(3)], name="flat-par",
                             config=ParallelConfig(nesting_type=NestingType.FLAT))

        def check(step_ctx):
            if os.path.exists(fail_flag):
                raise RuntimeError("not yet")
            return sum(batch.get_results())

        return ctx.step(check, name="check", config=NO_RETRY)

    return durable_execution(handler)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_finished_flat_parallel_replays_from_its_checkpoints(store_path, tmp_path, start_method):
    markers = tmp_path / "markers"
    markers.mkdir()
    flag = tmp_path / "fail"
    flag.write_text("")
    handler = _flat_parallel_handler(str(markers), str(flag))
    with pytest.raises(ExecutionFailedError):
        handler.run({}, execution_id="flat-replay", store=store_path, start_method=start_method,
                    max_workers=2)
    flag.unlink()
    # fix and resume: the handler runs again; the finished FLAT parallel replays, only `check` runs
    assert handler.run({}, execution_id="flat-replay", store=store_path, start_method=start_method,
                       max_workers=2) == 0 + 1 + 10 + 1 + 20 + 1
    assert _counts(markers, "work") == {0: 1, 1: 1, 2: 1}
    with Store(store_path) as st:
        ops = st.ops("flat-replay")
    batch = next(r for r in ops if r.name == "flat-par")
    kids = [r for r in ops if r.name.startswith("kid-")]
    assert len(kids) == 3 and all(r.parent_id == batch.op_id for r in kids)
    for i, kid in enumerate(sorted(kids, key=lambda r: r.name)):  # ids still prefixed by the branch's id
        assert kid.op_id == operation_id(operation_id(batch.op_id, i), 2)



@pytest.mark.parametrize("first, then", [(NestingType.NESTED, NestingType.FLAT), (NestingType.FLAT, NestingType.NESTED)])
def test_resuming_a_batch_under_the_other_nesting_type_is_non_deterministic(store_path, tmp_path, first, then):
    """The branches' checkpoints hang elsewhere under the other nesting: they would silently run again."""
    flag = tmp_path / "fail"
    flag.write_text("")

    def handler_of(nesting):
        def handler(event, ctx):
            batch = ctx.map([1, 2], lambda c, item, i, items: c.step(lambda sc: item, name=f"s{i}"), name="m",
                            config=MapConfig(nesting_type=nesting))

            def check(step_ctx):
                if os.path.exists(flag):
                    raise RuntimeError("not yet")
                return batch.get_results()

            return ctx.step(check, name="check", config=NO_RETRY)
        return durable_execution(handler)

    with pytest.raises(ExecutionFailedError):
        handler_of(first).run({}, execution_id="flip", store=store_path, max_workers=1)
    flag.unlink()
    with pytest.raises(ExecutionFailedError, match="Non-deterministic branch nesting") as stopped:
        handler_of(then).run({}, execution_id="flip", store=store_path, max_workers=1)
    assert isinstance(stopped.value.__cause__, NonDeterministicExecutionError)
    assert handler_of(first).run({}, execution_id="flip", store=store_path, max_workers=1) == [1, 2]


def _crashing_flat_map(markers: str):
    def item(ctx, value, index, items):
        def work(step_ctx):
            with open(os.path.join(markers, f"work-{index}"), "a") as f:
                f.write("x")
            return value * 10

        tens = ctx.step(work, name=f"work-{index}")

        def after(step_ctx):
            with open(os.path.join(markers, f"after-{index}"), "a") as f:
                f.write("x")
            if index == 1 and _counts(markers, "after")[1] == 1:
                time.sleep(4 * OUTBOX_FLUSH_SECONDS)  # the first step's record has left the worker's outbox
                os.kill(os.getpid(), signal.SIGKILL)  # the worker dies in the branch's second step
            return tens + 1

        return ctx.step(after, name=f"after-{index}")

    def handler(event, ctx):
        return ctx.map([0, 1, 2], item, name="flat-map",
                       config=MapConfig(nesting_type=NestingType.FLAT, max_concurrency=1)).get_results()

    return durable_execution(handler)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_flat_branch_whose_worker_died_is_redispatched_with_its_own_checkpoints(store_path, tmp_path,
                                                                                  start_method):
    markers = tmp_path / "markers"
    markers.mkdir()
    result = _crashing_flat_map(str(markers)).run({}, execution_id="flat-crash", store=store_path,
                                                  start_method=start_method, max_workers=1)
    assert result == [1, 11, 21]
    assert _counts(markers, "work") == {0: 1, 1: 1, 2: 1}  # the dead branch's first step replayed
    assert _counts(markers, "after") == {0: 1, 1: 2, 2: 1}
    _assert_flat_records(store_path, "flat-crash", "flat-map")


def _rec(op_id: str, name: str):
    from durable_mp.core.records import OpRecord, OpStatus

    return OpRecord(op_id, "batch", OpType.STEP, "Step", name, OpStatus.SUCCEEDED, 0.0)


def test_flat_branch_ops_follow_a_branchs_ids_and_stop_at_the_first_gap():
    from durable_mp.core.nesting import flat_branch_ops

    branch0, branch1 = operation_id("batch", 0), operation_id("batch", 1)
    virtual = operation_id(branch0, 2)  # a virtual child context: no record of its own
    under = {r.op_id: r for r in [
        _rec(operation_id(branch0, 1), "a"), _rec(operation_id(virtual, 1), "in-virtual"),
        _rec(operation_id(branch0, 3), "c"), _rec(operation_id(branch0, 5), "after-a-gap"),
        _rec(operation_id(branch1, 1), "other-branch"),
    ]}
    got = flat_branch_ops("batch", 0, under.get)
    assert [r.name for r in got] == ["a", "in-virtual", "c"]
    assert [r.name for r in flat_branch_ops("batch", 1, under.get)] == ["other-branch"]
    assert flat_branch_ops("batch", 2, under.get) == []
