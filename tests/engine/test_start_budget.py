"""The start budget of a percentage tolerance is exactly the reference's rule, at every boundary.

``CompletionPolicy.stop_distance`` tells a worker how many more failures complete the
batch, so it stops starting items then.  The reference SDK 3.0.0 decides with a float
comparison (``failed / total * 100 > tolerated_failure_percentage``); the distance must be
the smallest failure count that comparison calls exceeded, not the real-number
``int(pct * total / 100) + 1``, which is one too many where the float product rounds down
(20 items at 55 %: the reference stops at 11 failures).
"""

from __future__ import annotations

import pytest
from aws_durable_execution_sdk_python.concurrency.models import CompletionPolicy as ReferencePolicy

from durable_mp.concurrency.models import CompletionPolicy
from durable_mp.config import CompletionConfig

pytestmark = pytest.mark.process_free


def _reference_limit(total: int, pct: float, count: int | None = None) -> int | None:
    """The smallest failure count the reference calls tolerance exceeded (None: none up to ``total``)."""
    ref = ReferencePolicy(total=total, tolerated_failure_percentage=pct, tolerated_failure_count=count)
    return next((f for f in range(total + 1) if ref.is_tolerance_exceeded(f)), None)


# (total, percentage, failures the reference stops at): boundaries where the float product
# pct * total / 100 rounds one way and failed / total * 100 the other, exact integers, 0 and 100 %
TRUTH_TABLE = [
    (20, 55, 11), (25, 28, 7), (50, 14, 7), (40, 27.5, 11), (80, 55, 44),
    (20, 50, 11), (10, 10, 2), (3, 100 / 3, 2), (3, 33.3, 1), (7, 0, 1), (7, 100, None), (1, 99.9, 1),
    (100, 0.5, 1), (1000, 0.1, 2), (3, 66.7, 3), (4, 75, 4),
]


@pytest.mark.parametrize("total,pct,stops_at", TRUTH_TABLE)
def test_the_failure_budget_is_where_the_reference_stops(total, pct, stops_at):
    assert _reference_limit(total, pct) == stops_at  # the table is the reference's rule
    policy = CompletionPolicy(CompletionConfig(tolerated_failure_percentage=pct), total)
    assert policy.stop_distance()[0] == stops_at
    if stops_at is None:
        return
    for index in range(stops_at - 1):  # one failure short of it: one more completes the batch
        policy.on_started(index)
        policy.on_finished(index, False)
        assert policy.decision() is None
    assert policy.stop_distance()[0] == 1
    policy.on_started(stops_at - 1)
    policy.on_finished(stops_at - 1, False)
    assert policy.tolerance_exceeded()


def test_the_failure_budget_matches_the_reference_for_every_small_batch_and_percentage():
    pcts = [i / 4 for i in range(401)] + [i / 10 for i in range(1, 50)] + [100 / 3, 200 / 3, 33.3, 66.7]
    wrong = []
    for total in range(1, 81):
        for pct in pcts:
            for count in ((None, 3) if total % 10 == 0 else (None,)):
                config = CompletionConfig(tolerated_failure_percentage=pct, tolerated_failure_count=count)
                got = CompletionPolicy(config, total).stop_distance()[0]
                if got != _reference_limit(total, pct, count):
                    wrong.append((total, pct, count, got))
    assert wrong == []
