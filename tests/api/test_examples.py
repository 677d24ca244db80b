"""The examples the README points to run as documented, in a fresh directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from durable_mp.core.records import OpType
from durable_mp.store.facade import Store
from util import REPO

EXAMPLES = str(REPO / "examples")
pytestmark = pytest.mark.timeout(120)


def run_example(tmp_path, *args):
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, args[0]), *args[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=100,
                          env={**os.environ, "MONTECARLO_MARKERS": str(tmp_path)})


def test_seed_dashboard_runs_and_a_rerun_returns_the_checkpointed_result(tmp_path):
    first = run_example(tmp_path, "seed_dashboard.py", "demo")
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout[: first.stdout.rindex("}") + 1])
    assert out["user"]["user_id"] == "U001" and out["orders"]["total"] == 5000
    assert out["inventory"]["warehouse"] == "Tokyo"
    assert (out["status"], out["completion_reason"], out["success_count"]) == ("SUCCEEDED", "ALL_COMPLETED", 3)
    assert (tmp_path / ".durable_mp").is_dir(), "the default store lives in the working directory"
    again = run_example(tmp_path, "seed_dashboard.py", "demo")
    assert again.returncode == 0 and json.loads(again.stdout[: again.stdout.rindex("}") + 1]) == out


def steps_of(tmp_path, execution_id):
    """The step records of one run of an example, read from its default store."""
    with Store(tmp_path / ".durable_mp", readonly=True) as store:
        return {rec.name: rec for rec in store.ops(execution_id) if rec.op_type == OpType.STEP}


def test_seed_dashboard_branches_overlap_so_the_run_takes_the_longest_call(tmp_path):
    """The blog's first output (about 3 s for 2 s + 3 s + 2 s): every step starts before any ends."""
    run = run_example(tmp_path, "seed_dashboard.py", "overlap")
    assert run.returncode == 0, run.stderr
    steps = steps_of(tmp_path, "overlap")
    assert set(steps) == {"fetch_user", "fetch_orders", "fetch_inventory"}
    assert max(rec.start_ts for rec in steps.values()) < min(rec.end_ts for rec in steps.values())
    # the 3 s call ends last: the run waited for the slowest branch, not the sum
    assert max(steps.values(), key=lambda rec: rec.end_ts).name == "fetch_orders"


BLOG_ERROR_ISOLATION = {  # the blog post's output ("エラーの分離"), but for "inventory"
    "user": {"user_id": "U001", "name": "Taro Yamada", "email": "taro@example.com"},
    "orders": {"order_id": "O001", "items": ["item1", "item2"], "total": 5000},
    "total_count": 3,
    "success_count": 2,
    "failure_count": 1,
    "status": "FAILED",
    "completion_reason": "ALL_COMPLETED",
}


def test_seed_error_isolation_matches_the_blog(tmp_path):
    """Branch 3 fails at once; branches 1 and 2 still finish and report (docs/architecture.md "Completion")."""
    run = run_example(tmp_path, "seed_error_isolation.py", "isolation")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    inventory = out.pop("inventory")
    assert out == BLOG_ERROR_ISOLATION
    # The blog's "ErrorObject(message='エラー', type='CallableRuntimeError', data=None, stack_trace=None)":
    # durable_mp keeps the branch's own type and traceback (README, compatibility).
    assert inventory.startswith("ErrorObject(message='エラー', type='Exception', data=None, stack_trace=[")
    assert "raise Exception(" in inventory
    steps = steps_of(tmp_path, "isolation")
    assert set(steps) == {"fetch_user", "fetch_orders"}, "the failing branch raised before its step"
    with Store(tmp_path / ".durable_mp", readonly=True) as store:
        failed = [rec for rec in store.ops("isolation") if rec.status == "FAILED"]
    assert len(failed) == 1
    # the failure came first, and the running siblings were not stopped by it
    assert all(failed[0].end_ts < rec.end_ts for rec in steps.values())


def test_montecarlo_survives_a_segfaulting_worker(tmp_path):
    result = run_example(tmp_path, "montecarlo.py", "--branches", "8", "--crash")
    assert result.returncode == 0, result.stderr
    assert "branch 7 (map-item-7) died (killed by SIGSEGV(-11)" in result.stderr
    pi = float(result.stdout.split("~=")[1])
    assert 3.0 < pi < 3.3
