"""The re-run and fix-and-resume docs do what they say: the README's loop, the examples' docstrings.

Each command is taken from the text it documents (a README code block, an example's
docstring) and run as written, in a fresh directory with the default store.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest
from util import doc_block

from util import REPO

ROOT = str(REPO)
EXAMPLES = os.path.join(ROOT, "examples")


def _python(cwd, *args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _docstring(name: str) -> str:
    with open(os.path.join(EXAMPLES, name), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    assert doc
    return doc


@pytest.mark.timeout(240)
def test_the_readme_fix_and_resume_loop(tmp_path):
    source = doc_block("# squares.py")
    script = tmp_path / "squares.py"
    script.write_text(source)

    broken = _python(tmp_path, "squares.py")
    assert broken.returncode == 1 and "13 is unlucky" in broken.stderr

    bug = '        raise ValueError("13 is unlucky")  # the bug\n'
    assert bug in source
    script.write_text(source.replace(bug, "        pass\n"))  # the fix
    fixed = _python(tmp_path, "squares.py")
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.split() == ["2470"]
    assert "FAILED in an earlier run; resuming it" in fixed.stderr and "1 failed one(s) run again" in fixed.stderr

    done = _python(tmp_path, "squares.py")
    assert done.stdout.split() == ["2470"]
    assert "already SUCCEEDED at" in done.stderr and "To recompute: durable-mp delete job-" in done.stderr
    execution_id = re.search(r"durable-mp delete (\S+)", done.stderr).group(1)
    gone = _python(tmp_path, "-m", "durable_mp", "delete", execution_id)  # the command the notice names
    assert gone.returncode == 0, gone.stderr
    again = _python(tmp_path, "squares.py")
    assert again.stdout.split() == ["2470"] and "already SUCCEEDED" not in again.stderr  # recomputed


@pytest.mark.timeout(300)
def test_montecarlo_docstring_commands(tmp_path):
    doc = _docstring("montecarlo.py")
    assert "python examples/montecarlo.py " in doc
    show = re.search(r"python -m durable_mp show (\S+)", doc).group(1)
    run = _python(tmp_path, os.path.join(EXAMPLES, "montecarlo.py"), timeout=280)
    assert run.returncode == 0, run.stderr
    shown = _python(tmp_path, "-m", "durable_mp", "show", show)
    assert shown.returncode == 0, shown.stderr
    assert f"execution {show}  SUCCEEDED" in shown.stdout and "Map samples  SUCCEEDED" in shown.stdout


@pytest.mark.timeout(180)
def test_seed_dashboard_docstring_commands(tmp_path):
    doc = _docstring("seed_dashboard.py")
    assert "python examples/seed_dashboard.py           # a new execution" in doc
    assert "python examples/seed_dashboard.py my-run    # run it twice" in doc
    script = os.path.join(EXAMPLES, "seed_dashboard.py")

    first, second = _python(tmp_path, script), _python(tmp_path, script)
    ids = [re.search(r"execution '([^']+)' took", run.stderr).group(1) for run in (first, second)]
    assert ids[0] != ids[1] and "already SUCCEEDED" not in second.stderr  # without an id: a new one each time

    named = _python(tmp_path, script, "my-run")
    again = _python(tmp_path, script, "my-run")
    assert named.returncode == again.returncode == 0
    assert named.stdout == again.stdout
    assert "already SUCCEEDED" in again.stderr and "'my-run'" in again.stderr
