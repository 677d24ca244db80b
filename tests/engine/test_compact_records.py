"""The compact record of a plain map success: written by the worker, read back by every reader."""

from __future__ import annotations

import pytest

from durable_mp import durable_execution
from durable_mp.config import CompletionConfig, MapConfig
from durable_mp.core.item_probe import item_status as probe_status
from durable_mp.core.records import OpRecord, item_prefix, item_record, item_status, result_view
from durable_mp.exceptions import ExecutionFailedError
from durable_mp.store.facade import Store

pytestmark = pytest.mark.timeout(120)


@pytest.mark.process_free
def test_a_compact_record_reads_back_as_the_record_it_stands_for():
    parent, sub = item_prefix("p" * 64, "MapIteration")
    data = item_record("o" * 64, parent, sub, "map-item-é", 1.5, 2.5, 4321, '{"t":"i","v":3}')
    rec = OpRecord.loads(data)
    assert (rec.op_id, rec.parent_id, rec.sub_type, rec.name) == ("o" * 64, "p" * 64, "MapIteration", "map-item-é")
    assert (rec.status, rec.start_ts, rec.end_ts, rec.pid, rec.attempt) == ("SUCCEEDED", 1.5, 2.5, 4321, 1)
    assert rec.result == '{"t":"i","v":3}' and rec.error is None
    raw = item_record("o", parent, sub, "n", 1, 2, 3, b"\x80abc")
    assert OpRecord.loads(raw).result == b"\x80abc" and result_view(raw) == b"\x80abc"
    assert item_status(data) == probe_status(data) == "SUCCEEDED"
    failed = OpRecord("o", "p", "CONTEXT", "MapIteration", "n", "FAILED", 1, 2).dumps()
    assert item_status(failed) == probe_status(failed) == "FAILED"


def test_a_resumed_map_reads_its_compact_records_and_reruns_only_the_failed_item(tmp_path):
    flag = tmp_path / "fixed"
    ran = tmp_path / "ran"
    ran.mkdir()

    def item(ctx, x, index, items):
        (ran / f"{index}-{len(list(ran.iterdir()))}").touch()
        if index == 7 and not flag.exists():
            raise ValueError("not yet")
        return x * 3

    @durable_execution
    def handler(event, context):
        result = context.map(list(range(40)), item,
                             config=MapConfig(completion_config=CompletionConfig.all_completed()))
        result.throw_if_error()
        return result.get_results()

    store = str(tmp_path / "store")
    with pytest.raises(ExecutionFailedError):
        handler.run({}, execution_id="compact", store=store, max_workers=2)
    first = {p.name.split("-")[0] for p in ran.iterdir()}
    assert first == {str(i) for i in range(40)}
    flag.touch()
    before = len(list(ran.iterdir()))
    assert handler.run({}, execution_id="compact", store=store, max_workers=2) == [3 * x for x in range(40)]
    assert len(list(ran.iterdir())) - before == 1  # item 7 only: the other 39 replayed from compact records


@pytest.mark.parametrize("name", ["n" * 70_000, "é" * 40_000, "bad-\udc80-surrogate"],
                         ids=["70k-ascii", "80k-bytes-utf8", "surrogate"])
def test_an_item_whose_name_does_not_fit_the_compact_record_succeeds_with_its_name(name, tmp_path):
    """A name past the compact record's 64 KiB (or not encodable as UTF-8) takes the full record."""

    @durable_execution
    def handler(event, context):
        result = context.map([1, 2, 3], lambda c, x, i, xs: x * 10, config=MapConfig(
            item_namer=lambda x, i: name if i == 1 else f"item-{i}",
            completion_config=CompletionConfig.all_completed()))
        return [(it.status.value, it.result) for it in result.all]

    store = str(tmp_path / "store")
    assert handler.run({}, execution_id="long-name", store=store) == [
        ("SUCCEEDED", 10), ("SUCCEEDED", 20), ("SUCCEEDED", 30)]
    with Store(store) as s:
        names = {rec.name for rec in s.ops("long-name") if rec.sub_type == "MapIteration"}
    assert names == {"item-0", name, "item-2"}
