"""Resume of a big map reads item statuses without decoding every record (issue #11, target 4).

The bulk and probe paths must say exactly what the per-item paths said: same statuses,
same counts, same completion decision, same BatchResult.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from durable_mp import durable_execution
from durable_mp.concurrency.models import CompletionPolicy
from durable_mp.config import CompletionConfig, MapConfig, StepConfig
from durable_mp.core.item_probe import as_record, item_status, split_terminal
from durable_mp.core.records import OpRecord, OpStatus, OpType, branch_key, operation_id
from durable_mp.engine.lifecycle import BranchState, BranchTable, IllegalTransition
from durable_mp.exceptions import ExecutionFailedError, InvalidStateError
from durable_mp.retries import RetryPresets
from durable_mp.store.branch_scan import key_indices
from durable_mp.store.facade import Store
from util import runs_per_index

ALL_STATUSES = [OpStatus.STARTED, OpStatus.SUCCEEDED, OpStatus.FAILED, OpStatus.TIMED_OUT, OpStatus.PENDING]


def _item(index: int, status: str, result: object = None) -> OpRecord:
    return OpRecord(operation_id("batch", index), "batch", OpType.CONTEXT, "MapIteration", f"map-item-{index}",
                    status, 1.0, result=result)


@pytest.mark.process_free
@pytest.mark.parametrize("status", ALL_STATUSES)
@pytest.mark.parametrize("result", [None, "text", b"\x00" * 10, b"y" * 100_000])
def test_the_status_probe_reads_what_decoding_reads(status, result):
    rec = _item(3, status, result)
    data = rec.dumps()
    assert item_status(data) == item_status(memoryview(data)) == item_status(rec) == status
    assert as_record(data) == OpRecord.loads(data) and as_record(rec) is rec


@pytest.mark.process_free
def test_split_terminal_separates_ended_from_unfinished_and_says_which_succeeded():
    records = {i: (_item(i, s).dumps() if i % 2 else _item(i, s)) for i, s in enumerate(ALL_STATUSES * 3)}
    ended, ok, unfinished = split_terminal(records)
    assert set(ended) | set(unfinished) == set(records) and not set(ended) & set(unfinished)
    for i, data in records.items():
        status = as_record(data).status
        assert (i in ended) == (status in {OpStatus.SUCCEEDED, OpStatus.FAILED, OpStatus.TIMED_OUT})
        assert ok.get(i) == (status == OpStatus.SUCCEEDED if i in ended else None)
        assert (ended if i in ended else unfinished)[i] is data  # the stored bytes, not a decoded copy


@pytest.mark.process_free
@pytest.mark.parametrize("ok_share", [0.7, 1.0])
def test_bulk_replay_of_branches_equals_one_by_one(ok_share):
    rng = random.Random(7)
    outcomes = {i: rng.random() < ok_share for i in rng.sample(range(500), 300)}
    bulk, single = BranchTable(500), BranchTable(500)
    bulk.replayed_many(outcomes)
    for index, ok in outcomes.items():
        single.replayed(index, ok)
    assert [bulk.state(i) for i in range(500)] == [single.state(i) for i in range(500)]
    assert bulk.counts == single.counts and bulk.count(BranchState.PENDING) == 200
    assert bulk.pending() == [i for i in range(500) if i not in outcomes]
    assert BranchTable(3).pending() == [0, 1, 2]
    with pytest.raises(IllegalTransition):
        bulk.replayed_many({next(iter(outcomes)): True})  # already replayed
    with pytest.raises(IllegalTransition):
        bulk.replayed_many({i: True for i in range(500)})  # some were replayed already
    assert bulk.counts == single.counts


@pytest.mark.process_free
@pytest.mark.parametrize("config", [
    CompletionConfig(), CompletionConfig.all_completed(), CompletionConfig(tolerated_failure_count=3),
    CompletionConfig(tolerated_failure_percentage=40), CompletionConfig(min_successful=50),
    CompletionConfig.first_successful(),
])
@pytest.mark.parametrize("ok_share", [0.9, 1.0])
def test_bulk_replay_in_the_policy_equals_one_by_one(config, ok_share):
    rng = random.Random(11)
    outcomes = {i: rng.random() < ok_share for i in rng.sample(range(100), 60)}
    bulk = CompletionPolicy(config, 100)
    single = CompletionPolicy(config, 100)
    bulk.on_replayed(outcomes)
    for index, ok in outcomes.items():
        single.on_started(index)
        single.on_finished(index, ok)
    assert bulk.decision() == single.decision()
    assert (bulk.succeeded_count, bulk.failed_count, bulk.started_count, bulk.completed_count) == \
        (single.succeeded_count, single.failed_count, single.started_count, single.completed_count)
    assert bulk.stop_distance() == single.stop_distance()
    with pytest.raises(InvalidStateError):
        bulk.on_replayed({next(iter(outcomes)): True})
    with pytest.raises(InvalidStateError):
        CompletionPolicy(config, 100).on_replayed({100: True})
    with pytest.raises(InvalidStateError):
        CompletionPolicy(config, 100).on_replayed({-1: True})


@pytest.mark.process_free
def test_raw_item_records_include_staged_ones_and_decode_to_the_records(tmp_path):
    with Store(str(tmp_path / "store")) as store:
        committed = [_item(i, OpStatus.SUCCEEDED, b"%d" % i) for i in range(5)]
        for rec in committed:
            store.stage_raw("ex", "batch", branch_key(int(rec.name.rsplit("-", 1)[1])), rec.dumps())
        store.flush()
        staged = _item(7, OpStatus.FAILED)
        store.stage_raw("ex", "batch", branch_key(7), staged.dumps())  # visible before its commit
        raw = store.branch_raw("ex", "batch")
        assert {i: OpRecord.loads(d) for i, d in raw.items()} == store.branch_records("ex", "batch")
        assert sorted(raw) == [0, 1, 2, 3, 4, 7] and OpRecord.loads(raw[7]) == staged


def _key(r) -> tuple:
    return ([(b.index, b.status, b.result, b.error and b.error.message) for b in r.all],
            r.success_count, r.failure_count, r.started_count, r.total_count, r.status, r.completion_reason)


def _handler(markers, broken_items, broken_after, seen):
    def item(ctx, x, index, items):
        def work(step_ctx):
            open(os.path.join(markers, f"item-{index}-{os.urandom(6).hex()}"), "w").close()
            if index % 7 == 3 and os.path.exists(broken_items):
                raise ValueError(f"item {index} is broken")
            return {"x": x, "sq": x * x}
        return ctx.step(work, name="work", config=StepConfig(retry_strategy=RetryPresets.none()))

    @durable_execution
    def handler(event, ctx):
        result = ctx.map(list(range(60)), item, name="sixty",
                         config=MapConfig(max_concurrency=2,
                                          completion_config=CompletionConfig(tolerated_failure_count=30)))
        seen.append(result)
        if os.path.exists(broken_after):
            raise RuntimeError("the handler fails after the map")
        return [str(b.status.value) for b in result.all]

    return handler


@pytest.mark.timeout(120)
def test_a_finished_map_replays_its_batch_result_unchanged(tmp_path):
    """A map whose batch record ended replays from its stored item records (decoded only
    for the BatchResult): same statuses, results and counts, and no item runs again."""
    markers, store, after = tmp_path / "m", str(tmp_path / "store"), tmp_path / "after"
    markers.mkdir()
    after.touch()
    seen: list = []
    handler = _handler(markers, tmp_path / "no-broken-items", after, seen)
    for _ in range(2):
        with pytest.raises(ExecutionFailedError, match="fails after the map"):
            handler.run({"job": 1}, store=store, max_workers=2)
    assert runs_per_index(markers, "item") == {i: 1 for i in range(60)}
    assert _key(seen[1]) == _key(seen[0])
    assert seen[1].get_results() == [{"x": i, "sq": i * i} for i in range(60)]


@pytest.mark.timeout(120)
def test_fix_and_resume_of_a_map_reruns_only_the_failed_items_and_equals_a_fresh_run(tmp_path):
    markers, store = tmp_path / "m", str(tmp_path / "store")
    broken, after = tmp_path / "items", tmp_path / "after"
    markers.mkdir()
    broken.touch()
    after.touch()
    seen: list = []
    handler = _handler(markers, broken, after, seen)
    with pytest.raises(ExecutionFailedError, match="fails after the map"):
        handler.run({"job": 1}, store=store, max_workers=2)
    failed = {i for i in range(60) if i % 7 == 3}
    assert {b.index for b in seen[0].failed()} == failed
    broken.unlink()  # the fix
    after.unlink()
    assert handler.run({"job": 1}, store=store, max_workers=2) == ["SUCCEEDED"] * 60
    assert runs_per_index(markers, "item") == {i: 2 if i in failed else 1 for i in range(60)}  # only the failed ones again

    fresh_markers, fresh_seen = tmp_path / "fresh", []
    fresh_markers.mkdir()
    fresh = _handler(fresh_markers, broken, after, fresh_seen)
    assert fresh.run({"job": 1}, store=str(tmp_path / "fresh-store"), max_workers=2) == ["SUCCEEDED"] * 60
    assert _key(seen[1]) == _key(fresh_seen[0])


@pytest.mark.process_free
def test_branch_scan_reads_exactly_the_batch_keys(tmp_path):
    """Neighbouring prefixes ('#' sorts before '$'; another batch, another execution) are not read."""
    with Store(str(tmp_path / "store")) as store:
        for i in (0, 1, 2, 10, 11, 100, 1000):
            store.stage_raw("ex", "batch", branch_key(i), _item(i, OpStatus.SUCCEEDED, b"%d" % i).dumps())
        store.stage_raw("ex", "batch", "$after", _item(5, OpStatus.SUCCEEDED).dumps())
        store.stage_raw("ex", "batch", "step-under-batch", _item(6, OpStatus.SUCCEEDED).dumps())
        store.stage_raw("ex", "batch2", branch_key(3), _item(3, OpStatus.SUCCEEDED).dumps())
        store.stage_raw("ex", "batc", branch_key(4), _item(4, OpStatus.SUCCEEDED).dumps())
        store.stage_raw("ex2", "batch", branch_key(9), _item(9, OpStatus.SUCCEEDED).dumps())
        store.flush()
        raw = store.branch_raw("ex", "batch")
        assert sorted(raw) == [0, 1, 2, 10, 11, 100, 1000]
        assert all(OpRecord.loads(raw[i]).result == b"%d" % i for i in raw)
        assert store.branch_raw("ex", "nothing") == {}


@pytest.mark.process_free
@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 3000), max_size=600), st.integers(0, 2000))
def test_key_indices_reads_every_key_as_its_number(members, run_from):
    """Runs are read from their ends, the rest key by key: always the same numbers, in order."""
    indices = sorted(members | set(range(run_from, run_from + 500)))  # one long run and scattered ones
    prefix = b"ex\0batch\0"
    keys = [prefix + branch_key(i).encode() for i in indices]
    assert key_indices(keys, len(prefix) + 1) == indices  # after the '#' of branch_key
    mixed_width = sorted([prefix + b"#7", prefix + b"#10", prefix + b"#8"])  # not fixed width: parsed one by one
    assert key_indices(mixed_width, len(prefix) + 1) == [10, 7, 8]


@pytest.mark.process_free
def test_split_terminal_of_compact_records_only_and_mixed():
    from durable_mp.core.records import item_prefix, item_record
    parent, sub = item_prefix("batch", "MapIteration")
    compact = {i: item_record(operation_id("batch", i), parent, sub, f"map-item-{i}", 1.0, 2.0, 1, b"r")
               for i in range(6)}
    ended, ok, unfinished = split_terminal(dict(compact))
    assert ended == compact and ok == dict.fromkeys(compact, True) and unfinished == {}
    mixed = {**compact, 6: _item(6, OpStatus.STARTED).dumps(), 7: _item(7, OpStatus.FAILED)}
    ended, ok, unfinished = split_terminal(mixed)
    assert sorted(ended) == [0, 1, 2, 3, 4, 5, 7] and ok[7] is False and list(unfinished) == [6]
    assert split_terminal({}) == ({}, {}, {})


@pytest.mark.process_free
def test_pending_after_replay_lists_the_rest_in_order():
    table = BranchTable(10)
    table.replayed_many({3: True, 0: False, 9: True})
    assert table.pending() == [1, 2, 4, 5, 6, 7, 8]
    table.move(1, BranchState.DISPATCHED)
    assert table.pending() == [2, 4, 5, 6, 7, 8]


@pytest.mark.process_free
def test_columns_take_replayed_records_in_bulk_like_one_by_one():
    from durable_mp.concurrency.columns import ItemColumns
    records = {5: b"r5", 0: b"r0", 3: _item(3, OpStatus.FAILED)}
    bulk, single = ItemColumns(6), ItemColumns(6)
    bulk.add_records(records)
    single.update(records.items())
    assert bulk == single and len(bulk) == 3 and bulk.raw == records
    with pytest.raises(IndexError):
        ItemColumns(2).add_records({2: b"x"})


@pytest.mark.process_free
def test_branch_outcomes_split_plain_successes_from_the_rest_and_read_them_back(tmp_path):
    from durable_mp.core.records import item_prefix, item_record
    parent, sub = item_prefix("batch", "MapIteration")

    def compact(i: int) -> bytes:
        return item_record(operation_id("batch", i), parent, sub, f"map-item-{i}", 1.0, 2.0, 1, b"%d" % i)

    with Store(str(tmp_path / "store")) as store:
        for i in range(12):
            data = _item(i, OpStatus.FAILED).dumps() if i in (3, 8) else compact(i)
            store.stage_raw("ex", "batch", branch_key(i), data)
        store.stage_raw("ex", "other", branch_key(1), compact(1))
        store.flush()
        # staged wins: the same record again (a different one would move a terminal record backwards)
        store.stage_raw("ex", "batch", branch_key(5), compact(5))
        store.stage_raw("ex", "batch", branch_key(12), compact(12))
        plain, others = store.branch_outcomes("ex", "batch", ord("I"))
        assert plain == [0, 1, 2, 4, 6, 7, 9, 10, 11]
        assert sorted(others) == [3, 5, 8, 12]
        assert others[5] == compact(5) and others[12] == compact(12)
        seen: dict[int, bytes] = {}
        store.branch_each("ex", "batch", plain, seen.__setitem__)
        assert seen == {i: compact(i) for i in plain}
        assert store.branch_outcomes("ex", "none", ord("I")) == ([], {})
        store.flush()
        plain, others = store.branch_outcomes("ex", "batch", ord("I"))
        assert plain == [0, 1, 2, 4, 5, 6, 7, 9, 10, 11, 12] and sorted(others) == [3, 8]
