"""The engine's decisions and state machines, without processes: pure functions over numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from durable_mp.concurrency.models import CompletionPolicy
from durable_mp.config import CompletionConfig
from durable_mp.exceptions import InvalidStateError
from durable_mp.engine import scheduling as s
from durable_mp.engine.faults import (
    FaultCost,
    death_cost,
    is_waiting_on_io,
    kill_cost,
    may_have_started,
    split_lost_chunk,
)
from durable_mp.engine.lifecycle import (
    BranchState,
    BranchTable,
    IllegalTransition,
    WorkerState,
    check_worker_move,
)
from durable_mp.engine.protocol import UNLIMITED

pytestmark = pytest.mark.process_free  # no test here starts a process

# -- completion policy: distance to a decision ------------------------------------------------


@pytest.mark.parametrize("config, expected", [
    (CompletionConfig(), (1, None)),  # no criteria: fail-fast
    (CompletionConfig.all_successful(), (1, None)),
    (CompletionConfig.all_completed(), (None, None)),
    (CompletionConfig.first_successful(), (None, 1)),
    (CompletionConfig(tolerated_failure_count=2), (3, None)),
    (CompletionConfig(tolerated_failure_percentage=25), (3, None)),  # 3 of 10 is > 25 %
    (CompletionConfig(min_successful=4, tolerated_failure_count=1), (2, 4)),
])
def test_stop_distance_of_each_config(config, expected):
    assert CompletionPolicy(config, 10).stop_distance() == expected


@given(count=st.integers(0, 12), total=st.integers(1, 12), failed=st.integers(0, 12))
def test_stop_distance_is_exactly_the_failures_that_decide(count, total, failed):
    """Truth table: ``f`` more failures decide, ``f - 1`` do not."""
    failed = min(failed, total)
    policy = CompletionPolicy(CompletionConfig(tolerated_failure_count=count), total)
    for i in range(failed):
        policy.on_finished(i, False)
    if policy.decision() is not None:
        return
    f, _ = policy.stop_distance()
    if f is None:
        # no number of the remaining items can exceed the tolerance
        assert count >= total
        return
    probe = CompletionPolicy(CompletionConfig(tolerated_failure_count=count), total)
    for i in range(failed + f - 1):
        probe.on_finished(i, False)
    assert probe.tolerance_exceeded() is False
    probe.on_finished(failed + f - 1, False)
    assert probe.tolerance_exceeded() is True


@pytest.mark.parametrize("pct", [*range(0, 101), 12.5, 33.3, 66.67, 99.9])
def test_stop_distance_by_percentage_is_the_failure_that_exceeds_it(pct):
    """The start budget's count equals the policy's own comparison, ``failed / total * 100 > pct``
    (the reference's float arithmetic): 11 of 20 is 55.00000000000001 %, over 55 %, so the
    11th failure decides, not the 12th (issue 18: one item too many started)."""
    for total in range(1, 101):
        f, _ = CompletionPolicy(CompletionConfig(tolerated_failure_percentage=pct), total).stop_distance()
        deciding = next((n for n in range(1, total + 1) if n / total * 100 > pct), None)
        assert f == deciding, (total, pct)


def test_a_returned_unstarted_item_is_pending_again():
    policy = CompletionPolicy(None, 3)
    policy.on_started(1)
    policy.on_unstarted(1)
    assert policy.completion_status().items[1].status is None
    with pytest.raises(InvalidStateError):
        policy.on_unstarted(1)


# -- budgets and prefetch ----------------------------------------------------------------------


def test_a_worker_stops_its_chunk_once_its_own_outcomes_reach_the_budget():
    budget = s.start_budget(1, None)
    assert not s.stop_chunk(budget, failures=0, successes=50)
    assert s.stop_chunk(budget, failures=1, successes=0)
    assert not s.stop_chunk(UNLIMITED, failures=10**6, successes=10**6)
    assert s.stop_chunk(s.start_budget(None, 2), failures=0, successes=2)


def test_a_queued_chunk_counts_the_outcomes_the_driver_had_not_seen():
    """Budget relative to the worker: outcomes the driver already counted do not spend it twice."""
    budget = s.start_budget(1, None, seen=(2, 40))  # the driver had seen 2 failures and 40 successes
    assert not s.stop_chunk(budget, failures=2, successes=90)
    assert s.stop_chunk(budget, failures=3, successes=41)  # one failure the driver has not seen yet


def test_prefetch_rules():
    common = dict(has_timeout=False)
    assert s.may_prefetch(is_map=True, queued=s.PREFETCH_MIN_ITEMS, cpu_share=None, **common)
    assert not s.may_prefetch(is_map=True, queued=s.PREFETCH_MIN_ITEMS - 1, cpu_share=None, **common)
    assert not s.may_prefetch(is_map=False, queued=100, cpu_share=None, **common)  # unknown: maybe I/O-bound
    assert s.may_prefetch(is_map=False, queued=100, cpu_share=0.95, **common)
    assert not s.may_prefetch(is_map=False, queued=100, cpu_share=0.1, **common)
    assert not s.may_prefetch(is_map=True, queued=10**6, cpu_share=1.0, has_timeout=True)


# -- chunk sizes and concurrency ----------------------------------------------------------------


def test_parallel_and_timed_branches_go_one_at_a_time():
    assert s.chunk_size(100, 2, 1e-6, is_map=False, has_timeout=False) == 1
    assert s.chunk_size(100, 2, 1e-6, is_map=True, has_timeout=True) == 1
    assert s.chunk_size(0, 2, None, is_map=True, has_timeout=False) == 0


@given(queued=st.integers(1, 10**6), allowed=st.integers(1, 64),
       item=st.one_of(st.none(), st.floats(1e-8, 10.0)))
def test_map_chunks_are_bounded_and_leave_work_for_every_worker(queued, allowed, item):
    size = s.chunk_size(queued, allowed, item, is_map=True, has_timeout=False)
    assert 1 <= size <= min(queued, s.MAX_CHUNK_ITEMS)
    if item is not None and item >= s.TARGET_CHUNK_SECONDS:
        assert size == 1  # slow items: one per chunk
    if item is None:
        assert size <= s.FIRST_CHUNK_ITEMS


def test_concurrency_limit():
    assert s.concurrency_limit(3, None, 8, io_waiting=5) == (3, 3)  # explicit: as given
    assert s.concurrency_limit(None, None, 2, io_waiting=0) == (2, 2 * s.GROWTH_CAP_PER_CPU)
    assert s.concurrency_limit(None, None, 2, io_waiting=3) == (5, 2 * s.GROWTH_CAP_PER_CPU)
    assert s.concurrency_limit(None, 4, 2, io_waiting=10) == (12, 4)  # the pool never grows past max_workers


# -- faults -------------------------------------------------------------------------------------


def test_what_a_fault_costs():
    assert death_cost(1, 3) is FaultCost.REDISPATCH
    assert death_cost(3, 3) is FaultCost.FAIL_BRANCH
    assert kill_cost(step_watches=1, step_scoped=True) is FaultCost.RETRY_STEP
    assert kill_cost(step_watches=2, step_scoped=True) is FaultCost.FAIL_BRANCH  # no single step to charge
    assert kill_cost(step_watches=1, step_scoped=False) is FaultCost.FAIL_BRANCH
    assert is_waiting_on_io(0.05, runnable=False)
    assert not is_waiting_on_io(0.05, runnable=True)  # starved, not waiting
    assert not is_waiting_on_io(0.05, runnable=False, durable_sleep=True)  # a retry delay: CPU-bound after it


def test_a_lost_chunk_blames_the_running_branch_only():
    assert split_lost_chunk([4, 5, 6, 7], {4}, 5, 2) == (5, [], [6, 7])
    assert split_lost_chunk([4, 5, 6, 7], {4, 5}, None, 0) == (6, [], [7])  # slot cleared: first unreported
    assert split_lost_chunk([4], {4}, None, 1) == (None, [], [])


def test_a_lost_chunk_reruns_with_checkpoints_every_unreported_branch_the_worker_had_begun():
    # issue 18 defect 1: 4 ended but was not reported (its records died in the outbox) when 5 crashed
    assert split_lost_chunk([3, 4, 5, 6, 7], {3}, 5, 3) == (5, [4], [6, 7])
    # the worker ran through the whole chunk and died before ChunkDone: all of it may have started,
    # and the blame (bounding a death that recurs) falls on the last branch it ran
    assert split_lost_chunk([3, 4, 5], {3}, None, 3) == (5, [4], [])
    # the slot names another chunk (reached 0): nothing of this one began; blame stays on the first
    assert split_lost_chunk([3, 4, 5], set(), None, 0) == (3, [], [4, 5])


def test_a_death_after_a_chunk_stopped_early_never_blames_a_branch_it_did_not_begin():
    """The worker's budget (or a skipped sleep) stopped the chunk after 2 of 4 branches, both
    reported, and it died before its ChunkDone was read: 5 and 6 never began, so neither is
    charged a crash (with max_crash_retries used up, 5 would have FAILED without running)."""
    assert split_lost_chunk([3, 4, 5, 6], {3, 4}, None, 2) == (None, [], [5, 6])
    assert split_lost_chunk([3, 4, 5, 6], {3}, None, 2) == (4, [], [5, 6])  # 4 ran last, unreported
    assert split_lost_chunk([], set(), None, 1) == (None, [], [])  # a driver-level step's call: no chunk


def test_a_chunk_killed_because_its_batch_completed_names_only_the_branches_that_may_have_started():
    """Found by tests/test_early_completion_race.py: map of 64, max_concurrency=1, first_successful.
    The worker ran item 0, its budget stopped the chunk, and the driver killed it before reading
    ChunkDone: item 1, never begun, was recorded STARTED as if it were a death's guilty branch."""
    assert may_have_started(list(range(16)), {0}, None, 1) == []
    assert may_have_started([4, 5, 6, 7], {4}, 5, 2) == [5]  # running the second
    assert may_have_started([4, 5, 6, 7], {4}, 6, 2) == [5, 6]  # the slot's index is set before its count
    assert may_have_started([3, 4, 5], {3}, None, 3) == [4, 5]  # went through: records still in the outbox
    assert may_have_started([3, 4, 5], set(), None, 0) == []  # the slot names another chunk: none of it began


def test_the_workers_slot_says_how_far_into_which_chunk_it_got():
    from array import array

    from durable_mp.engine.pool import Worker
    from durable_mp.engine.worker import IDLE, PROGRESS_SHIFT

    worker = Worker.__new__(Worker)
    slot = array("q", [IDLE, (7 << PROGRESS_SHIFT) + 3])  # began the 3rd item of chunk 7
    worker.index_view = memoryview(slot)
    assert [worker.begun(task, 10) for task in (6, 7, 8)] == [10, 3, 0]  # an earlier chunk: all of it


# -- state machines -----------------------------------------------------------------------------


def test_branch_lifecycle_and_its_illegal_moves():
    table = BranchTable(3)
    table.move(0, BranchState.DISPATCHED)
    table.finish(0, BranchState.SUCCEEDED)  # dispatched -> running -> succeeded
    assert table.state(0) is BranchState.SUCCEEDED
    table.move(1, BranchState.DISPATCHED)
    table.move(1, BranchState.RUNNING)
    table.move(1, BranchState.REQUEUED)  # its worker died: it may have started
    table.move(1, BranchState.DISPATCHED)
    table.move(1, BranchState.PENDING)  # returned unstarted
    with pytest.raises(IllegalTransition):
        table.move(0, BranchState.PENDING)  # a finished branch never runs again
    with pytest.raises(IllegalTransition):
        table.move(2, BranchState.RUNNING)  # nothing runs without being dispatched
    assert not table.all_ended()
    table.replayed(2, succeeded=False)
    assert table.count(BranchState.FAILED) == 1 and table.count(BranchState.PENDING) == 1


def test_worker_lifecycle():
    check_worker_move(WorkerState.IDLE, WorkerState.BUSY, 1)
    check_worker_move(WorkerState.BUSY, WorkerState.DEAD, 1)
    with pytest.raises(IllegalTransition):
        check_worker_move(WorkerState.DEAD, WorkerState.IDLE, 1)
    with pytest.raises(IllegalTransition):
        check_worker_move(WorkerState.DRAINING, WorkerState.BUSY, 1)


def test_bulk_moves_match_one_by_one_moves_and_refuse_illegal_ones():
    one, bulk = BranchTable(6), BranchTable(6)
    for i in range(4):
        one.move(i, BranchState.DISPATCHED)
    bulk.move_many([0, 1, 2, 3], BranchState.DISPATCHED)
    for i in (0, 2):
        one.finish(i, BranchState.SUCCEEDED)
    bulk.finish_many([0, 2], BranchState.SUCCEEDED)
    assert [one.state(i) for i in range(6)] == [bulk.state(i) for i in range(6)]
    assert one.counts == bulk.counts
    with pytest.raises(IllegalTransition):
        bulk.finish_many([4], BranchState.SUCCEEDED)  # never dispatched
    with pytest.raises(IllegalTransition):
        bulk.move_many([0], BranchState.DISPATCHED)  # finished


@given(st.lists(st.tuples(st.sampled_from(["move", "finish"]), st.sampled_from(list(BranchState)),
                          st.lists(st.integers(0, 7), max_size=6) | st.tuples(st.integers(0, 7), st.integers(0, 8)).map(
                              lambda ab: list(range(ab[0], min(8, ab[0] + ab[1]))))),
                max_size=12))
def test_bulk_moves_of_any_indices_agree_with_one_by_one_moves(steps):
    """Consecutive runs (slice path), scattered and repeated indices: same states, counts and
    errors as moving one branch at a time; a refused bulk move changes nothing."""
    one, bulk = BranchTable(8), BranchTable(8)
    for how, to, indices in steps:
        single = one.finish if how == "finish" else one.move
        snapshot = [one.state(i) for i in range(8)], list(one.counts)
        try:
            for index in indices:
                single(index, to)
        except IllegalTransition:
            one_failed = True
            for i, state in enumerate(snapshot[0]):  # one-by-one moves may half-apply: roll back to compare
                one._states[i] = state
            one.counts[:] = snapshot[1]
        else:
            one_failed = False
        before = [bulk.state(i) for i in range(8)], list(bulk.counts)
        try:
            (bulk.finish_many if how == "finish" else bulk.move_many)(indices, to)
        except IllegalTransition:
            assert one_failed
            if len(set(indices)) == len(indices):  # all checked before anything moved
                assert ([bulk.state(i) for i in range(8)], bulk.counts) == before
            for i, state in enumerate(before[0]):
                bulk._states[i] = state
            bulk.counts[:] = before[1]
        else:
            assert not one_failed
        assert [one.state(i) for i in range(8)] == [bulk.state(i) for i in range(8)]
        assert one.counts == bulk.counts
        assert sum(bulk.counts) == 8


def test_bulk_policy_events_match_one_by_one_events():
    one, bulk = CompletionPolicy(CompletionConfig.first_successful(), 5), \
        CompletionPolicy(CompletionConfig.first_successful(), 5)
    for i in (0, 1, 2):
        one.on_started(i)
    bulk.on_started_many([0, 1, 2])
    for i in (0, 2):
        one.on_finished(i, True)
    bulk.on_succeeded_many([0, 2])
    assert (one.succeeded_count, one.started_count, one.decision()) == \
        (bulk.succeeded_count, bulk.started_count, bulk.decision())
    with pytest.raises(InvalidStateError):
        bulk.on_succeeded_many([0])  # finished twice
    with pytest.raises(InvalidStateError):
        bulk.on_started_many([7])


_INDEX_LISTS = st.lists(st.integers(-1, 8), max_size=6) | st.tuples(st.integers(0, 7), st.integers(0, 9)).map(
    lambda ab: list(range(ab[0], ab[0] + ab[1])))  # runs, some past the end


@given(st.lists(st.tuples(st.sampled_from(["start", "succeed"]), _INDEX_LISTS), max_size=10))
def test_bulk_policy_events_of_any_indices_agree_with_one_by_one_events(steps):
    """Runs (slice path), scattered, repeated and out-of-range indices: same counts, states
    and errors as one event per item."""
    def policy() -> CompletionPolicy:
        return CompletionPolicy(CompletionConfig.all_completed(), 8)

    one, bulk = policy(), policy()
    for how, indices in steps:
        single = one.on_started if how == "start" else (lambda i: one.on_finished(i, True))
        try:
            for index in indices:
                single(index)
        except InvalidStateError:
            one_failed = True
        else:
            one_failed = False
        try:
            (bulk.on_started_many if how == "start" else bulk.on_succeeded_many)(indices)
        except InvalidStateError:
            assert one_failed
        else:
            assert not one_failed
        assert (one.succeeded_count, one.started_count, bytes(one._states)) == \
            (bulk.succeeded_count, bulk.started_count, bytes(bulk._states))
