"""A BatchResult on ItemColumns behaves exactly like one built from BatchItem objects."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from durable_mp.concurrency.columns import ItemColumns
from durable_mp.concurrency.models import BatchItem, BatchItemStatus, BatchResult, CompletionReason
from durable_mp.exceptions import ChildContextError
from durable_mp.lambda_service import ErrorObject

pytestmark = pytest.mark.process_free  # no test here starts a process

S, F, ST = BatchItemStatus.SUCCEEDED, BatchItemStatus.FAILED, BatchItemStatus.STARTED


def _error(i: int) -> ErrorObject:
    return ErrorObject(message=f"boom {i}", type="ValueError", data=None, stack_trace=None)


def _pair(spec: dict[int, tuple[BatchItemStatus, object]], n: int,
          reason: CompletionReason = CompletionReason.ALL_COMPLETED) -> tuple[BatchResult, BatchResult]:
    """(eager, lazy) results of the same items; ``spec`` maps index -> (status, result or error)."""
    items = []
    cols = ItemColumns(n)
    for index in sorted(spec):
        status, payload = spec[index]
        result = payload if status is S else None
        error = payload if status is F else None
        items.append(BatchItem(index, status, result, error))
        cols.set_item(index, status, result, error)  # type: ignore[arg-type]
    return BatchResult(items, reason), BatchResult.of_columns(cols, reason)


MIXED = {0: (S, "a"), 1: (F, _error(1)), 3: (S, None), 4: (ST, None), 6: (F, _error(6)), 7: (S, [1, 2])}


def _public(result: BatchResult) -> dict:
    return {
        "results": result.get_results(), "errors": result.get_errors(), "succeeded": result.succeeded(),
        "failed": result.failed(), "started": result.started(), "status": result.status,
        "has_failure": result.has_failure, "counts": (result.success_count, result.failure_count,
                                                      result.started_count, result.total_count),
        "successful": result.successful_results, "failed_results": result.failed_results,
        "reason": result.completion_reason, "to_dict": result.to_dict(),
    }


@pytest.mark.parametrize("spec,n", [(MIXED, 9), ({i: (S, i * 2) for i in range(5)}, 5), ({}, 3), ({}, 0),
                                    ({2: (F, _error(2))}, 3)])
def test_lazy_result_answers_like_the_eager_one(spec, n):
    eager, lazy = _pair(spec, n)
    assert _public(lazy) == _public(eager)
    assert "all" not in lazy.__dict__  # nothing above needed the BatchItem list
    assert lazy.all == eager.all
    assert lazy == eager and eager == lazy
    assert repr(lazy) == repr(eager)


def test_throw_if_error_raises_for_the_first_failed_item_without_building_all():
    _, lazy = _pair(MIXED, 9)
    with pytest.raises(ChildContextError, match="boom 1"):
        lazy.throw_if_error()
    assert "all" not in lazy.__dict__
    _, ok = _pair({0: (S, 1)}, 1)
    ok.throw_if_error()


@pytest.mark.parametrize("materialise", [False, True])
def test_pickle_and_copy_round_trip(materialise):
    eager, lazy = _pair(MIXED, 9)
    if materialise:
        lazy.all  # noqa: B018
    for clone in (pickle.loads(pickle.dumps(lazy)), copy.deepcopy(lazy), copy.copy(lazy)):
        assert clone == eager
        assert _public(clone) == _public(eager)
    assert pickle.loads(pickle.dumps(eager)) == eager


def test_dataclass_helpers_see_the_items():
    eager, lazy = _pair(MIXED, 9)
    assert dataclasses.asdict(lazy) == dataclasses.asdict(eager)
    replaced = dataclasses.replace(lazy, completion_reason=CompletionReason.MIN_SUCCESSFUL_REACHED)
    assert replaced.all == eager.all and replaced.completion_reason is CompletionReason.MIN_SUCCESSFUL_REACHED
    with pytest.raises(TypeError):
        hash(lazy)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lazy.completion_reason = CompletionReason.ALL_COMPLETED  # type: ignore[misc]


def test_all_once_built_is_the_truth():
    """A caller that changes ``all`` sees the change in every other answer, as with a plain list."""
    _, lazy = _pair({0: (S, 1), 1: (S, 2)}, 2)
    lazy.all.append(BatchItem(2, F, None, _error(2)))
    assert lazy.get_results() == [1, 2]
    assert lazy.failure_count == 1 and lazy.total_count == 3 and lazy.has_failure


def test_results_are_a_new_list_each_time():
    _, lazy = _pair({0: (S, 1), 1: (S, 2)}, 2)
    lazy.get_results().append(99)
    assert lazy.get_results() == [1, 2]


def test_missing_attribute_is_an_attribute_error():
    _, lazy = _pair(MIXED, 9)
    with pytest.raises(AttributeError):
        lazy.nope  # noqa: B018
    assert not hasattr(lazy, "nope")


def test_of_columns_refuses_undecoded_records():
    cols = ItemColumns(2)
    cols[0] = b"record bytes"
    with pytest.raises(Exception, match="not decoded"):
        BatchResult.of_columns(cols, CompletionReason.ALL_COMPLETED)


class TestItemColumns:
    def test_set_values_contiguous_and_scattered(self):
        cols = ItemColumns(8)
        cols.set_values([2, 3, 4], ["c", "d", "e"])
        cols.set_values([7, 0], ["h", "a"])
        assert cols.status == bytearray([1, 0, 1, 1, 1, 0, 0, 1])
        assert cols.values == ["a", None, "c", "d", "e", None, None, "h"]
        assert len(cols) == 5 and 3 in cols and 1 not in cols

    def test_set_values_replaces_raw_records_and_errors(self):
        cols = ItemColumns(4)
        cols[1] = b"raw"
        cols.set_item(2, F, None, _error(2))
        cols.set_values([1, 2], ["x", "y"])
        assert cols.raw == {} and cols.errors == {}
        assert cols.results() == ["x", "y"]

    def test_set_values_checks_lengths(self):
        with pytest.raises(ValueError):
            ItemColumns(3).set_values([0, 1], ["a"])

    def test_a_batch_item_is_unpacked(self):
        cols = ItemColumns(2)
        cols[1] = BatchItem(1, S, "v")
        assert cols.raw == {} and cols.results() == ["v"]

    def test_of_records(self):
        cols = ItemColumns.of({0: b"r0", 2: BatchItem(2, S, 5)}, 3)
        assert cols.raw == {0: b"r0"} and cols.values[2] == 5 and len(cols) == 2


def _compact(index: int, payload):
    from durable_mp.core.records import item_prefix, item_record, operation_id
    parent, sub = item_prefix("batch", "MapIteration")
    return item_record(operation_id("batch", index), parent, sub, f"map-item-{index}", 1.0, 2.0, 1, payload)


def test_resumed_records_decode_the_same_on_the_fast_path(monkeypatch):
    """Compact records decoded straight from their bytes give the BatchResult the general path gives."""
    import types

    from durable_mp.operation import batch as batch_mod
    from durable_mp.core.records import OpRecord, OpStatus, OpType
    from durable_mp.serdes import envelope_of, pickle_parts

    failed = OpRecord("op-3", "batch", OpType.CONTEXT, "MapIteration", "map-item-3", OpStatus.FAILED, 1.0,
                      error=_error(3).to_dict())
    records = {0: _compact(0, pickle.dumps({"a": 1})), 1: _compact(1, envelope_of([1, "x"])), 2: _compact(2, None),
               3: failed.dumps(), 5: _compact(5, b"not a pickle"), 6: _compact(6, pickle_parts(b"z" * 300_000)),
               7: _compact(7, pickle.dumps(7))}
    records = {i: (b"".join(r) if isinstance(r, list) else r) for i, r in records.items()}
    fake = types.SimpleNamespace(execution_id="ex")
    build = batch_mod.batch_result
    fast = build(fake, ItemColumns.of(dict(records), 9), CompletionReason.ALL_COMPLETED, None, 9)
    monkeypatch.setattr(batch_mod, "fast_decodable", lambda serdes: False)
    slow = build(fake, ItemColumns.of(dict(records), 9), CompletionReason.ALL_COMPLETED, None, 9)
    assert fast == slow
    assert _public(fast) == _public(slow)
    assert fast.get_results()[:2] == [{"a": 1}, [1, "x"]] and fast.get_results()[-1] == 7 and fast.total_count == 7
