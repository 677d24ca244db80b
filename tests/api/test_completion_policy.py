"""CompletionPolicy against the reference's rules (§5), as a truth table and as properties."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from durable_mp.concurrency.models import (
    BatchItemStatus,
    CompletionOutcome,
    CompletionPolicy,
    CompletionReason,
    CompletionStatus,
    complete_batch,
    continue_batch,
)
from durable_mp.config import CompletionConfig
from durable_mp.exceptions import InvalidStateError, ValidationError

pytestmark = pytest.mark.process_free  # no test here starts a process

ALL = CompletionReason.ALL_COMPLETED
MIN = CompletionReason.MIN_SUCCESSFUL_REACHED
FTE = CompletionReason.FAILURE_TOLERANCE_EXCEEDED
CUSTOM_OK = CompletionReason.CUSTOM_COMPLETION_SUCCEEDED
CUSTOM_FAIL = CompletionReason.CUSTOM_COMPLETION_FAILED


def trace(config: CompletionConfig | None, total: int, events: str) -> list[CompletionReason | None]:
    """Feed events ("s3" = item 3 succeeded, "f3" failed, "r3" started) and record
    ``decision()`` before the first event and after each one."""
    policy = CompletionPolicy(config, total)
    decisions = [policy.decision()]
    for event in events.split():
        kind, index = event[0], int(event[1:])
        if kind == "r":
            policy.on_started(index)
        else:
            policy.on_finished(index, kind == "s")
        decisions.append(policy.decision())
    return decisions


# (config, total, events, decision after every step incl. the initial one)
TRUTH_TABLE = [
    # map default CompletionConfig(): no criteria = fail-fast
    (CompletionConfig(), 4, "s0 f1", [None, None, FTE]),
    (CompletionConfig(), 2, "s0 s1", [None, None, ALL]),
    (None, 3, "f2", [None, FTE]),
    # parallel default all_successful(): first failure stops
    (CompletionConfig.all_successful(), 3, "s0 f1", [None, None, FTE]),
    (CompletionConfig.all_successful(), 2, "s1 s0", [None, None, ALL]),
    # all_completed(): 100 % tolerated, runs everything
    (CompletionConfig.all_completed(), 3, "f0 f1 s2", [None, None, None, ALL]),
    (CompletionConfig.all_completed(), 2, "f0 f1", [None, None, ALL]),
    # first_successful(): first success wins; all failing runs to the end
    (CompletionConfig.first_successful(), 3, "f0 s1", [None, None, MIN]),
    (CompletionConfig.first_successful(), 2, "f0 f1", [None, None, ALL]),
    (CompletionConfig.first_successful(), 1, "s0", [None, ALL]),  # all completed beats min reached
    # tolerated_failure_count
    (CompletionConfig(tolerated_failure_count=1), 3, "f0 s1 s2", [None, None, None, ALL]),
    (CompletionConfig(tolerated_failure_count=1), 3, "f0 f1", [None, None, FTE]),
    (CompletionConfig(tolerated_failure_count=0), 2, "f1", [None, FTE]),
    # tolerated_failure_percentage (of the total, strictly greater)
    (CompletionConfig(tolerated_failure_percentage=50), 4, "f0 f1 f2", [None, None, None, FTE]),
    (CompletionConfig(tolerated_failure_percentage=50), 4, "f0 f1 s2 s3", [None, None, None, None, ALL]),
    (CompletionConfig(tolerated_failure_percentage=0), 5, "s0 f1", [None, None, FTE]),
    (CompletionConfig(tolerated_failure_percentage=33.4), 3, "f0 f1", [None, None, FTE]),
    (CompletionConfig(tolerated_failure_percentage=34), 3, "f0 s1 s2", [None, None, None, ALL]),
    # count and percentage together: either one exceeded is enough
    (CompletionConfig(tolerated_failure_count=5, tolerated_failure_percentage=10), 10, "f0 f1", [None, None, FTE]),
    (CompletionConfig(tolerated_failure_count=1, tolerated_failure_percentage=90), 10, "f0 f1", [None, None, FTE]),
    # min_successful alone tolerates any number of failures
    (CompletionConfig(min_successful=2), 4, "f0 f1 s2 s3", [None, None, None, None, ALL]),
    (CompletionConfig(min_successful=2), 4, "s0 f1 s2", [None, None, None, MIN]),
    (CompletionConfig(min_successful=2, tolerated_failure_count=1), 5, "s0 f1 f2", [None, None, None, FTE]),
    # starts never decide anything
    (CompletionConfig(), 2, "r0 r1 s0", [None, None, None, None]),
    # total 0: complete before anything starts, whatever the config
    (CompletionConfig(), 0, "", [ALL]),
    (CompletionConfig.all_completed(), 0, "", [ALL]),
]


@pytest.mark.parametrize(("config", "total", "events", "expected"), TRUTH_TABLE)
def test_truth_table(config, total, events, expected):
    assert trace(config, total, events) == expected


def test_tolerance_beats_min_successful_when_both_hold():
    policy = CompletionPolicy(CompletionConfig(min_successful=1, tolerated_failure_count=0), 3)
    policy.on_finished(0, True)
    policy.on_finished(1, False)
    assert policy.decision() is FTE


def test_all_completed_beats_min_successful_when_both_hold():
    policy = CompletionPolicy(CompletionConfig(min_successful=2), 2)
    policy.on_finished(0, True)
    policy.on_finished(1, True)
    assert policy.decision() is ALL


def test_min_successful_greater_than_total_is_rejected_up_front():
    with pytest.raises(ValidationError, match="min_successful cannot be greater than total items: 3 > 2"):
        CompletionPolicy(CompletionConfig(min_successful=3), 2)
    with pytest.raises(ValidationError):
        CompletionPolicy(CompletionConfig.first_successful(), 0)
    CompletionPolicy(CompletionConfig(min_successful=2), 2)  # equal is fine


def test_decision_is_latched_once_made():
    policy = CompletionPolicy(CompletionConfig.first_successful(), 3)
    policy.on_started(0)
    policy.on_started(1)
    policy.on_finished(1, True)
    assert policy.decision() is MIN
    # a branch that was still running finishes later: counts move, the reason does not
    policy.on_finished(0, False)
    policy.on_finished(2, False)
    assert policy.decision() is MIN
    assert (policy.succeeded_count, policy.failed_count, policy.started_count) == (1, 2, 0)


def test_counts_and_transitions():
    policy = CompletionPolicy(CompletionConfig.all_completed(), 3)
    policy.on_started(0)
    policy.on_started(0)  # re-dispatch after a worker crash is allowed
    policy.on_started(1)
    assert policy.started_count == 2
    policy.on_finished(0, True)
    policy.on_finished(2, False)  # finishing without a start (replayed checkpoint) is allowed
    assert (policy.succeeded_count, policy.failed_count, policy.started_count) == (1, 1, 1)
    assert policy.completed_count == 2 and policy.total == 3 and not policy.is_decided
    with pytest.raises(InvalidStateError, match="finished twice"):
        policy.on_finished(0, False)
    with pytest.raises(InvalidStateError, match="already finished"):
        policy.on_started(2)
    with pytest.raises(InvalidStateError, match="out of range"):
        policy.on_started(3)
    with pytest.raises(InvalidStateError, match="out of range"):
        policy.on_finished(-1, True)


# --- custom should_complete predicates -------------------------------------------------


def test_predicate_is_evaluated_before_anything_starts():
    seen: list[CompletionStatus] = []

    def stop_at_once(status: CompletionStatus):
        seen.append(status)
        return complete_batch()

    policy = CompletionPolicy(CompletionConfig(should_complete=stop_at_once), 3, names=["a", None, "c"])
    assert policy.decision() is CUSTOM_OK
    (status,) = seen
    assert (status.success_count, status.failure_count, status.completed_count, status.total_count) == (0, 0, 0, 3)
    assert [(i.index, i.name, i.status) for i in status.items] == [(0, "a", None), (1, None, None), (2, "c", None)]


def test_predicate_sees_every_item_state_in_index_order():
    snapshots: list[CompletionStatus] = []

    def record(status):
        snapshots.append(status)
        return continue_batch()

    policy = CompletionPolicy(CompletionConfig(should_complete=record), 4)
    policy.on_started(0)
    policy.on_started(1)
    policy.on_started(2)
    policy.on_finished(1, True)
    policy.on_finished(2, False)
    assert policy.decision() is None
    assert [i.status for i in snapshots[-1].items] == [
        BatchItemStatus.STARTED, BatchItemStatus.SUCCEEDED, BatchItemStatus.FAILED, None,
    ]
    assert snapshots[-1].completed_count == 2


def test_predicate_failed_outcome_on_first_failure():
    def fail_on_first_failure(status):
        return complete_batch(CompletionOutcome.FAILED) if status.failure_count else continue_batch()

    config = CompletionConfig(should_complete=fail_on_first_failure)
    assert trace(config, 3, "s0 f1") == [None, None, CUSTOM_FAIL]


def test_predicate_disables_tolerance_and_runs_to_all_completed():
    config = CompletionConfig(should_complete=lambda status: continue_batch())
    assert trace(config, 3, "f0 f1 f2") == [None, None, None, ALL]


def test_predicate_firing_on_the_last_item_beats_all_completed():
    def at_two(status):
        return complete_batch() if status.completed_count == 2 else continue_batch()

    config = CompletionConfig(should_complete=at_two)
    assert trace(config, 2, "s0 f1") == [None, None, CUSTOM_OK]


def test_predicate_runs_once_per_state_change():
    calls = []
    config = CompletionConfig(should_complete=lambda s: calls.append(s) or continue_batch())
    policy = CompletionPolicy(config, 3)
    policy.decision()
    policy.decision()
    assert len(calls) == 1
    policy.on_started(0)
    policy.decision()
    policy.decision()
    assert len(calls) == 2


def test_predicate_must_return_a_completion_decision():
    policy = CompletionPolicy(CompletionConfig(should_complete=lambda s: True), 2)
    with pytest.raises(ValidationError, match="must return a CompletionDecision"):
        policy.decision()


def test_quorum_predicate_by_index():
    # "complete when branch 0 succeeds OR branches 1 and 2 both succeed"
    def quorum(status):
        ok = [i.status is BatchItemStatus.SUCCEEDED for i in status.items]
        return complete_batch() if ok[0] or (ok[1] and ok[2]) else continue_batch()

    config = CompletionConfig(should_complete=quorum)
    assert trace(config, 4, "s1 f3 s2") == [None, None, None, CUSTOM_OK]
    assert trace(config, 4, "s1 f2 s0") == [None, None, None, CUSTOM_OK]
    assert trace(config, 3, "s1 f2 f0") == [None, None, None, ALL]


def test_fast_without_predicate():
    total = 200_000
    policy = CompletionPolicy(CompletionConfig.all_completed(), total)
    start = time.perf_counter()
    for i in range(total):
        policy.on_started(i)
        policy.decision()
        policy.on_finished(i, i % 3 != 0)
        policy.decision()
    assert policy.decision() is ALL
    assert time.perf_counter() - start < 2.0


# --- properties -------------------------------------------------------------------------


def reference_reason(config: CompletionConfig, total: int, s: int, f: int, custom) -> CompletionReason | None:
    """The reference's §5 pseudo-code, written independently of CompletionPolicy."""
    thresholds = (config.min_successful, config.tolerated_failure_count, config.tolerated_failure_percentage)
    if config.should_complete is not None:
        exceeded = False
    elif all(t is None for t in thresholds):
        exceeded = f > 0
    else:
        exceeded = (config.tolerated_failure_count is not None and f > config.tolerated_failure_count) or (
            config.tolerated_failure_percentage is not None and total > 0
            and f / total * 100 > config.tolerated_failure_percentage
        )
    fired = custom is not None and custom.complete
    complete = fired or s + f >= total or (config.min_successful is not None and s >= config.min_successful)
    if not (complete or exceeded):
        return None
    if exceeded:
        return FTE
    if fired:
        return CUSTOM_FAIL if custom.outcome is CompletionOutcome.FAILED else CUSTOM_OK
    if s + f >= total:
        return ALL
    if config.min_successful is not None and s >= config.min_successful:
        return MIN
    return ALL


@st.composite
def scenarios(draw):
    total = draw(st.integers(0, 12))
    kind = draw(st.sampled_from(["thresholds", "predicate"]))
    if kind == "predicate":
        k = draw(st.integers(1, 4))
        outcome = draw(st.sampled_from(list(CompletionOutcome)))
        on_failures = draw(st.booleans())

        def predicate(status):
            count = status.failure_count if on_failures else status.success_count
            return complete_batch(outcome) if count >= k else continue_batch()

        config = CompletionConfig(should_complete=predicate)
    else:
        config = CompletionConfig(
            min_successful=draw(st.none() | st.integers(1, max(total, 1))) if total else None,
            tolerated_failure_count=draw(st.none() | st.integers(0, 5)),
            tolerated_failure_percentage=draw(st.none() | st.floats(0, 100) | st.integers(0, 100)),
        )
    order = draw(st.permutations(range(total)))
    outcomes = draw(st.lists(st.booleans(), min_size=total, max_size=total))
    started_first = draw(st.lists(st.booleans(), min_size=total, max_size=total))
    return config, total, [(i, outcomes[i], started_first[i]) for i in order]


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_decisions_match_reference_latch_and_keep_counts(scenario):
    config, total, events = scenario
    policy = CompletionPolicy(config, total)
    decided = policy.decision()
    expected_first = None if total else ALL
    s = f = 0
    for index, ok, start in events:
        if start:
            policy.on_started(index)
            assert policy.started_count >= 1
        policy.on_finished(index, ok)
        s, f = s + ok, f + (not ok)
        assert (policy.succeeded_count, policy.failed_count, policy.started_count) == (s, f, 0)
        now = policy.decision()
        if decided is not None:
            assert now is decided  # monotonic: a decision, once made, stays
        else:
            custom = config.should_complete(policy.completion_status()) if config.should_complete else None
            assert now is reference_reason(config, total, s, f, custom)
            decided = now
    if total == 0:
        assert decided is expected_first
    assert decided is not None  # every item finished: some decision must have been made
    assert policy.completed_count == total
