"""One per-item table per batch: the dispatcher's branch states and the completion policy's counts
are two views of ``concurrency.item_table.ItemTable``, never two copies kept in step."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from durable_mp.concurrency.columns import ItemColumns, RunningColumns
from durable_mp.concurrency.item_table import ITEM_MOVES, STARTED, ItemState, ItemTable
from durable_mp.concurrency.models import CompletionPolicy
from durable_mp.config import CompletionConfig
from durable_mp.core.completion import BatchItemStatus, continue_batch
from durable_mp.core.spec import BatchSpec
from durable_mp.engine.batch_run import BatchRun
from durable_mp.engine.lifecycle import BranchState, BranchTable, IllegalTransition

pytestmark = pytest.mark.process_free  # no test here starts a process

S = ItemState


def _spec(policy: CompletionPolicy, n: int) -> BatchSpec:
    return BatchSpec(op_id="op", sub_type="Map", item_sub_type="MapIteration", name=None, n=n, names=None,
                     funcs=None, func=len, inputs=list(range(n)), item_serdes=None, max_concurrency=None,
                     branch_timeout=None, policy=policy)


def test_a_running_batch_moves_its_branches_in_the_policys_own_table():
    policy = CompletionPolicy(CompletionConfig.all_completed(), 4)
    batch = BatchRun(_spec(policy, 4))
    assert batch.branches is policy.items
    batch.branches.move_many([0, 1, 2], BranchState.DISPATCHED)
    batch.branches.finish_many([0], BranchState.SUCCEEDED)
    batch.branches.finish(1, BranchState.FAILED)
    assert (policy.succeeded_count, policy.failed_count, policy.started_count) == (1, 1, 1)
    assert policy.decision() is None


def test_a_requeued_branch_waits_in_the_queue_but_still_counts_as_started():
    """After a worker death the branch is not on any worker, yet it may have started: the policy's
    counts and a predicate see it STARTED, as they did while it ran."""
    seen = []
    policy = CompletionPolicy(CompletionConfig(should_complete=lambda s: seen.append(s) or continue_batch()), 3)
    table = policy.items
    table.move(1, S.DISPATCHED)
    table.move(1, S.RUNNING)
    policy.decision()
    table.move(1, S.REQUEUED)
    assert table.pending() == [0, 2]  # a resume's queue holds only never-started branches
    assert policy.started_count == 1
    policy.decision()
    assert len(seen) == 1  # nothing a predicate sees changed: it is not asked again
    assert seen[0].items[1].status is BatchItemStatus.STARTED
    table.move(1, S.DISPATCHED)  # sent again, with its checkpoints
    policy.decision()
    assert len(seen) == 1 and policy.started_count == 1
    table.finish(1, S.SUCCEEDED)
    policy.decision()
    assert len(seen) == 2 and seen[1].items[1].status is BatchItemStatus.SUCCEEDED
    assert (policy.succeeded_count, policy.started_count) == (1, 0)


def test_a_requeued_branch_can_only_be_sent_again_or_failed():
    table = BranchTable(2)
    table.move(0, S.DISPATCHED)
    table.move(0, S.REQUEUED)
    for illegal in (S.PENDING, S.RUNNING, S.SUCCEEDED, S.ABANDONED, S.REQUEUED):
        with pytest.raises(IllegalTransition):
            table.move(0, illegal)
    table.move(0, S.FAILED)  # it crashed its worker once too often
    assert table.count(S.FAILED) == 1 and table.started_count() == 0


def test_a_returned_unstarted_branch_is_not_counted_as_started():
    policy = CompletionPolicy(None, 2)
    policy.items.move(0, S.DISPATCHED)
    assert policy.started_count == 1
    policy.items.move(0, S.PENDING)
    assert policy.started_count == 0
    assert policy.completion_status().items[0].status is None


def test_an_abandoned_branch_stays_started_for_the_policy():
    policy = CompletionPolicy(CompletionConfig(min_successful=1), 3)
    policy.items.move_many([0, 1], S.DISPATCHED)
    policy.items.finish(0, S.SUCCEEDED)
    policy.items.finish(1, S.ABANDONED)
    assert policy.decision() is not None
    assert (policy.succeeded_count, policy.failed_count, policy.started_count) == (1, 0, 1)


_MOVES = st.lists(st.tuples(st.integers(0, 5), st.sampled_from(list(ItemState)), st.booleans()), max_size=40)


@given(_MOVES)
def test_counts_kept_by_transitions_equal_the_states_in_the_table(moves):
    """The policy keeps no counts of its own: what it reads is the table's, and they always agree
    with the bytes, whichever moves were legal."""
    policy = CompletionPolicy(CompletionConfig.all_completed(), 6)
    table = policy.items
    for index, to, finish in moves:
        try:
            table.finish(index, to) if finish else table.move(index, to)
        except IllegalTransition:
            assert to not in ITEM_MOVES[table.state(index)] or finish
        states = bytes(table.states)
        assert table.counts == [states.count(s) for s in ItemState]
        assert policy.succeeded_count == states.count(S.SUCCEEDED)
        assert policy.failed_count == states.count(S.FAILED)
        assert policy.started_count == sum(states.count(s) for s in STARTED)
        assert [i.status for i in policy.completion_status().items] == [
            None if s == S.PENDING else BatchItemStatus.SUCCEEDED if s == S.SUCCEEDED
            else BatchItemStatus.FAILED if s == S.FAILED else BatchItemStatus.STARTED for s in states]


def test_policy_events_are_moves_in_the_same_table():
    """A scheduler without branch states (threads, ``from_items``) reports events; they land in the table."""
    policy = CompletionPolicy(CompletionConfig.all_completed(), 4)
    policy.on_started_many([0, 1])
    policy.on_finished(1, False)
    policy.on_succeeded_many([2, 3])  # outcomes of items never dispatched
    assert [policy.items.state(i) for i in range(4)] == [S.DISPATCHED, S.FAILED, S.SUCCEEDED, S.SUCCEEDED]
    assert policy.items.counts[S.SUCCEEDED] == 2 and policy.started_count == 1


def test_a_resume_replays_into_the_one_table():
    policy = CompletionPolicy(CompletionConfig.all_completed(), 5)
    spec = _spec(policy, 5)
    spec.done, spec.done_ok = {0: b"r0", 3: b"r3"}, {0: True, 3: False}
    batch = BatchRun(spec)
    spec.replay_into(batch.records)
    assert batch.branches.pending() == [1, 2, 4]
    assert (policy.succeeded_count, policy.failed_count) == (1, 1)
    with pytest.raises(IllegalTransition):
        batch.branches.replayed_many({1: True, 3: True})  # 3 was replayed already: nothing moves
    assert batch.branches.pending() == [1, 2, 4]


# -- the result columns take their status from the table ------------------------------------

_N = 8
_STEPS = st.lists(st.tuples(st.sampled_from(["dispatch", "value", "values", "raw_ok", "fail", "abandon"]),
                            st.integers(0, _N - 1), st.integers(1, 4)), max_size=30)


@given(st.dictionaries(st.integers(0, _N - 1), st.booleans(), max_size=4), _STEPS)
def test_sealed_running_columns_equal_columns_that_kept_their_own_status(replayed, steps):
    """What the intake writes while a batch runs, into ``RunningColumns`` (no status byte) and into
    ``ItemColumns`` (its own status byte, as before): after the batch they hold the same result."""
    policy = CompletionPolicy(CompletionConfig.all_completed(), _N)
    table = policy.items
    running, kept = RunningColumns(table), ItemColumns(_N)
    records = {i: f"done{i}" for i in replayed}
    policy.on_replayed(replayed)
    running.add_records(records)
    kept.add_records(records)
    for how, first, size in steps:
        indices = list(range(first, min(_N, first + size)))
        if how == "dispatch":
            waiting = [i for i in indices if table.states[i] in (S.PENDING, S.REQUEUED)]
            table.move_many(waiting, S.DISPATCHED)
            continue
        on_worker = [i for i in indices if table.states[i] in (S.DISPATCHED, S.RUNNING)]
        if not on_worker:
            continue
        if how == "values":  # a chunk of plain successes (``finish_succeeded``)
            running.set_values(on_worker, [i * 10 for i in on_worker])
            kept.set_values(on_worker, [i * 10 for i in on_worker])
            table.finish_many(on_worker, S.SUCCEEDED)
            continue
        index = on_worker[0]
        if how == "value":
            running.set_item(index, BatchItemStatus.SUCCEEDED, index)
            kept.set_item(index, BatchItemStatus.SUCCEEDED, index)
        else:  # a record to decode later: an unreadable success, a failure, a STARTED record
            running[index] = kept[index] = f"rec{index}"
        table.finish(index, {"value": S.SUCCEEDED, "raw_ok": S.SUCCEEDED, "fail": S.FAILED,
                             "abandon": S.ABANDONED}[how])
        assert [i in running for i in range(_N)] == [i in kept for i in range(_N)]
        assert len(running) == len(kept)  # intake.record_admitted's "every item has its record"
    assert [i in running for i in range(_N)] == [i in kept for i in range(_N)]
    assert running.seal() == kept


def test_a_running_batch_keeps_failures_as_records():
    with pytest.raises(ValueError, match="as its record"):
        RunningColumns(ItemTable(2)).set_item(0, BatchItemStatus.FAILED)
