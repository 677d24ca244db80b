"""Regression tests for the engine defects of "Engine v2" (issue 8): each failed on the old engine.

Real worker processes and a real store; no wall-clock budgets (ordering, counts and
process evidence only).
"""

from __future__ import annotations


import pytest

from durable_mp import durable_execution

pytestmark = pytest.mark.timeout(120)


# -- a branch's traceback starts at the user's code ------------------------------------------
def test_a_failed_branch_traceback_starts_in_user_code(store_path):
    def boom(ctx):
        raise RuntimeError("orders service down")

    @durable_execution
    def handler(event, ctx):
        return ctx.parallel([boom]).all[0].error.stack_trace

    trace = "".join(handler.run(None, store=store_path))
    assert "engine/branch.py" not in trace, trace
    assert __file__ in trace and "orders service down" in trace
