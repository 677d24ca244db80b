"""Operation ids are the reference SDK's (so checkpoints line up operation by operation)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from durable_mp import ValidationError, durable_execution
from durable_mp.core.records import OpRecord, operation_id
from durable_mp.store.facade import Store

# measured on the reference SDK 3.0.0 (reference doc, section 5)
ROOT_FIRST = "1ced8f5be2db"
BRANCH_0 = "1712f93e2f51"
STEP_IN_BRANCH_0 = "48550629202c"


@pytest.mark.process_free
def test_ids_match_the_reference():
    root = operation_id("", 1)
    assert root.startswith(ROOT_FIRST) and len(root) == 64
    branch = operation_id(root, 0)
    assert branch.startswith(BRANCH_0)
    assert operation_id(branch, 1).startswith(STEP_IN_BRANCH_0)


@pytest.mark.timeout(60)
def test_recorded_operations_carry_reference_ids_and_parents(store_path):
    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([lambda c: c.step(lambda _: 1, name="s"), lambda c: 2], name="p").get_results()

    assert handler.run(None, store=store_path) == [1, 2]
    with Store(store_path) as st:
        ops = {r.name: r for r in st.ops(handler.execution_id_for(None))}
    parallel, branch0, step = ops["p"], ops["parallel-branch-0"], ops["s"]
    assert parallel.op_id.startswith(ROOT_FIRST) and parallel.parent_id == ""
    assert (parallel.op_type, parallel.sub_type, parallel.status) == ("CONTEXT", "Parallel", "SUCCEEDED")
    assert branch0.op_id.startswith(BRANCH_0) and branch0.parent_id == parallel.op_id
    assert (branch0.sub_type, ops["parallel-branch-1"].sub_type) == ("ParallelBranch", "ParallelBranch")
    assert step.op_id.startswith(STEP_IN_BRANCH_0) and step.parent_id == branch0.op_id


@pytest.mark.process_free
def test_record_bytes_round_trip_every_result_kind():
    base = OpRecord("a" * 64, "", "STEP", "Step", "n", "SUCCEEDED", 1.0, 2.0)
    for result in (None, b"", b"\x00raw\xff" * 100, "text ✓", ""):
        rec = base._replace(result=result, attempts=((1, 1.0, 2.0, 7, None),), extra={"k": [1]})
        assert OpRecord.loads(rec.dumps()) == rec


# -- default execution ids ---------------------------------------------------------------------
ID_SCRIPT = textwrap.dedent(
    """
    import dataclasses, datetime, decimal, enum, json, pathlib, sys, uuid
    from durable_mp import durable_execution

    class Color(enum.Enum):
        RED = "red"

    @dataclasses.dataclass(frozen=True)
    class Window:
        start: datetime.date
        tags: frozenset

    @durable_execution
    def handler(event, ctx):
        return None

    EVENTS = {
        "set": {"regions": {"eu-west-1", "us-east-1", "ap-south-1", "sa-east-1", "ca-central-1"}},
        "mixed": {
            ("a", 1): [1.5, -0.0, float("inf"), b"\\x00raw", bytearray(b"ba"), None, True],
            frozenset({"x", "y", "z"}): {3, 1, 2},
            "when": datetime.datetime(2026, 11, 26, 12, 30, tzinfo=datetime.timezone.utc),
            "day": datetime.date(2026, 11, 26),
            "amount": decimal.Decimal("12.50"),
            "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
            "path": pathlib.Path("/data/in"),
            "color": Color.RED,
            "window": Window(datetime.date(2026, 1, 1), frozenset({"p", "q", "r"})),
        },
        "json": {"b": [1, 2.5, "x"], "a": None},
    }
    print(json.dumps({k: handler.execution_id_for(v) for k, v in EVENTS.items()}))
    """
)
HASH_SEEDS = ("0", "1", "2", "3", "random")


def test_default_execution_ids_are_the_same_under_every_hash_seed(tmp_path):
    script = tmp_path / "ids.py"
    script.write_text(ID_SCRIPT)
    seen = []
    for seed in HASH_SEEDS:
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONHASHSEED": seed})
        assert out.returncode == 0, out.stderr
        seen.append(json.loads(out.stdout))
    assert all(ids == seen[0] for ids in seen), seen
    assert len(set(seen[0].values())) == len(seen[0])
    assert all(value.startswith("handler-") for value in seen[0].values()), "the readable prefix stays"


def _handler():
    @durable_execution
    def handler(event, ctx):
        return None

    return handler


@pytest.mark.process_free
@pytest.mark.parametrize("a,b", [
    ([1, 2], (1, 2)),
    ({1, 2}, frozenset({1, 2})),
    ({"k": 1}, {"k": 1.0}),
    ({"k": True}, {"k": 1}),
    ({1: "a"}, {"1": "a"}),
    (0.0, -0.0),
    (b"a", "a"),
    (b"a", bytearray(b"a")),
    (["ab"], ["a", "b"]),
    ([[1], 2], [[1, 2]]),
    ({"a": {"b": 1}}, {"a": {"b": 1}, "c": None}),
])
def test_default_execution_ids_tell_events_apart(a, b):
    handler = _handler()
    assert handler.execution_id_for(a) != handler.execution_id_for(b)


@pytest.mark.process_free
def test_default_execution_ids_ignore_dict_and_set_order():
    handler = _handler()
    assert handler.execution_id_for({"a": 1, 2: "b", (3,): {4, 5}}) == handler.execution_id_for(
        {(3,): {5, 4}, 2: "b", "a": 1})


@pytest.mark.process_free
def test_default_execution_ids_of_json_events_are_unchanged():
    """A JSON event keeps the id it had before the canonical encoding (running jobs still resume)."""
    handler = _handler()
    event = {"date": "2026-11-26", "items": [1, 2.5, None, True], "name": "nightly ✓"}
    old = json.dumps(event, sort_keys=True, default=repr).encode()
    where = f"{handler.func.__module__}:{handler.func.__qualname__}"
    digest = hashlib.blake2b(where.encode() + b"\0" + old, digest_size=8).hexdigest()
    assert handler.execution_id_for(event) == f"{handler.func.__qualname__}-{digest}"


class _Opaque:
    pass


@pytest.mark.process_free
@pytest.mark.parametrize("event,type_name,where", [
    ({"when": _Opaque()}, "_Opaque", "event['when']"),
    ([1, {2: threading.Lock()}], "lock", "event[1][2]"),
    ({"fn": len}, "builtin_function_or_method", "event['fn']"),
])
def test_an_event_without_a_canonical_encoding_needs_an_explicit_id(event, type_name, where):
    handler = _handler()
    with pytest.raises(ValidationError) as info:
        handler.execution_id_for(event)
    message = str(info.value)
    assert type_name in message and where in message
    assert "execution_id=" in message


@pytest.mark.process_free
def test_an_event_refused_for_the_default_id_runs_under_an_explicit_one(store_path):
    handler = _handler()
    with pytest.raises(ValidationError):
        handler.run({"when": _Opaque()}, store=store_path)
    assert handler.run({"when": _Opaque()}, store=store_path, execution_id="explicit") is None


@pytest.mark.process_free
def test_an_event_that_contains_itself_needs_an_explicit_id():
    handler = _handler()
    event: list = [1]
    event.append(event)
    with pytest.raises(ValidationError, match=r"event\[1\].*contains itself.*execution_id="):
        handler.execution_id_for(event)


# -- default ids of programs without a file (python -c, IPython, Jupyter) -------------------------

C_PROGRAM = """
import sys
from durable_mp import durable_execution

@durable_execution
def h(event, ctx):
    return {answer!r}

print(h.execution_id_for({{}}))
print(h.run({{}}, store=sys.argv[1]))
"""


def _run_c(program: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.timeout(120)
def test_two_python_c_programs_with_the_same_handler_name_do_not_share_an_execution(store_path):
    first = C_PROGRAM.format(answer="first")
    second = C_PROGRAM.format(answer="second")
    id1, answer1 = _run_c(first, store_path)
    id2, answer2 = _run_c(second, store_path)
    assert (answer1, answer2) == ("first", "second")  # the second did not print the first one's answer
    assert id1 != id2 and id1.startswith("h-") and id2.startswith("h-")
    again, _ = _run_c(first, store_path)
    assert again == id1  # the same program resumes its own execution


IPYTHON_HANDLER = """
from durable_mp import durable_execution

@durable_execution
def h(event, ctx):
    return 42
"""


def _ipython_id(extra_cells: int) -> str:
    """The default id of ``h`` defined in an IPython cell after ``extra_cells`` other cells."""
    code = "\n".join(["ip = get_ipython()"] + ["ip.run_cell('x = 1', store_history=True)"] * extra_cells + [
        f"ip.run_cell({IPYTHON_HANDLER!r}, store_history=True)",
        "ip.run_cell('print(\"ID\", h.execution_id_for({}), h.func.__code__.co_filename)')",
    ])
    out = subprocess.run([sys.executable, "-m", "IPython", "--quick", "--no-banner", "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("ID "))
    _, ident, filename = line.split()
    return ident + " " + filename


@pytest.mark.timeout(120)
def test_ipython_default_id_does_not_depend_on_the_cell_number():
    pytest.importorskip("IPython")
    first, file1 = _ipython_id(0).split()
    second, file2 = _ipython_id(2).split()
    assert file1 != file2  # IPython named the cells differently ...
    assert first == second  # ... and the id did not follow


KERNEL_CELL = """
import os, sys
from durable_mp import durable_execution, ExecutionFailedError
from durable_mp.config import StepConfig
from durable_mp.retries import RetryPresets

@durable_execution
def h(event, ctx):
    def work(_):
        open(os.path.join({marks!r}, "work-" + str(os.getpid())), "w").close()
        return 6 * 7
    def check(_):
        open(os.path.join({marks!r}, "check-" + str(os.getpid())), "w").close()
        if os.path.exists({flag!r}):
            raise ValueError("not yet")
        return True
    value = ctx.step(work, name="work")
    ctx.step(check, name="check", config=StepConfig(retry_strategy=RetryPresets.none()))
    return value

try:
    print("RESULT", h.run({{"n": 1}}, store={store!r}), h.execution_id_for({{"n": 1}}))
except ExecutionFailedError as exc:
    print("FAILED", h.execution_id_for({{"n": 1}}))
"""


def _kernel_run(client, code: str) -> str:
    reply_output = []

    def keep(msg):
        if msg["msg_type"] == "stream":
            reply_output.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            reply_output.append("\n".join(msg["content"]["traceback"]))

    reply = client.execute_interactive(code, timeout=90, output_hook=keep)
    text = "".join(reply_output)
    assert reply["content"]["status"] == "ok", text
    return text


@pytest.mark.timeout(240)
def test_a_jupyter_kernel_restart_resumes_the_same_execution(tmp_path):
    """Fix and resume across a kernel restart: the failed step runs again, the finished one replays."""
    manager_mod = pytest.importorskip("jupyter_client.manager")
    pytest.importorskip("ipykernel")
    marks = tmp_path / "marks"
    marks.mkdir()
    flag = tmp_path / "broken"
    flag.touch()
    store = str(tmp_path / "store")
    cell = KERNEL_CELL.format(marks=str(marks), store=store, flag=str(flag))
    km, client = manager_mod.start_new_kernel(kernel_name="python3")
    try:
        _kernel_run(client, "x = 1")  # another cell number the first time
        first = _kernel_run(client, cell)
        km.restart_kernel(now=True)
        client.wait_for_ready(timeout=60)
        flag.unlink()  # the fix
        second = _kernel_run(client, cell)
        third = _kernel_run(client, cell)
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)
    failed = next(line for line in first.splitlines() if line.startswith("FAILED"))
    resumed = next(line for line in second.splitlines() if line.startswith("RESULT"))
    assert resumed.split()[1] == "42" and resumed.split()[2] == failed.split()[1], (first, second)
    kinds = sorted(name.split("-")[0] for name in os.listdir(marks))
    assert kinds == ["check", "check", "work"], kinds  # after the restart it was the same execution
    assert "already SUCCEEDED" in third and third.splitlines()[-1] == resumed  # and a re-run says so
