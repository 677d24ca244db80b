"""The examples the README points to run as documented, in a fresh directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
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


def test_montecarlo_survives_a_segfaulting_worker(tmp_path):
    result = run_example(tmp_path, "montecarlo.py", "--branches", "8", "--crash")
    assert result.returncode == 0, result.stderr
    assert "branch 7 (map-item-7) died (killed by SIGSEGV(-11)" in result.stderr
    pi = float(result.stdout.split("~=")[1])
    assert 3.0 < pi < 3.3
