"""Serializers: pickle default with cloudpickle fallback, the reference envelope, errors."""

from __future__ import annotations

import collections
import json
import pickle
import threading
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone
from decimal import Decimal

import numpy as np
import pytest

from durable_mp import serdes as sd
from durable_mp.concurrency.models import BatchItem, BatchItemStatus, BatchResult, CompletionReason
from durable_mp.exceptions import RetryableSerDesError, SerDesError
from durable_mp.lambda_service import ErrorObject

pytestmark = pytest.mark.process_free  # no test here starts a process

CTX = sd.SerDesContext()


@dataclass(frozen=True)
class Point:
    x: int
    y: float


def batch() -> BatchResult:
    return BatchResult(
        [
            BatchItem(0, BatchItemStatus.SUCCEEDED, {"branch": 0, "attempt": 1}),
            BatchItem(1, BatchItemStatus.FAILED, None, ErrorObject("branch 1 exploded", "ValueError", None, None)),
            BatchItem(2, BatchItemStatus.STARTED),
        ],
        CompletionReason.ALL_COMPLETED,
    )


def round_trip(value, serdes=None):
    data = sd.serialize(serdes, value, what="test value")
    return data, sd.deserialize(serdes, data, what="test value")


# --- DefaultSerDes: the reference's envelope where exact, pickle elsewhere ---------------

# Payloads as the reference's ExtendedTypeSerDes writes them (json.dumps, compact separators).
REFERENCE_PAYLOADS = [
    (7, "7"),
    ("エラー", '"\\u30a8\\u30e9\\u30fc"'),
    (None, "null"),
    ([1, 2.5, None, True], "[1,2.5,null,true]"),
    ({"a": [1, 2.5, None]}, '{"t":"m","v":{"a":{"t":"l","v":[{"t":"i","v":1},{"t":"f","v":2.5},{"t":"n","v":null}]}}}'),
    ((1, "a"), '{"t":"t","v":[{"t":"i","v":1},{"t":"s","v":"a"}]}'),
    (b"x", '{"t":"B","v":"eA=="}'),
]


@pytest.mark.parametrize(("value", "payload"), REFERENCE_PAYLOADS)
def test_default_writes_the_reference_envelope_byte_for_byte(value, payload):
    data, back = round_trip(value)
    assert data == payload and data == sd.ExtendedTypeSerDes().serialize(value)
    assert back == value and type(back) is type(value)


class Flag(int):
    """An int subclass: JSON would bring it back as a plain int."""


@pytest.mark.parametrize("value", [{1: "int keys"}, Flag(3), [Point(1, 2.5)], 10 ** 5000,
                                   collections.OrderedDict(a=1), np.arange(3)],
                         ids=["int-keys", "int-subclass", "dataclass", "huge-int", "ordered-dict", "array"])
def test_default_pickles_what_the_envelope_cannot_bring_back_exactly(value):
    data, back = round_trip(value)
    assert isinstance(data, bytes) and data[:2] == b"\x80\x05"  # pickle protocol 5
    assert type(back) is type(value)
    assert np.array_equal(back, value) if isinstance(value, np.ndarray) else back == value


# Values of every shape whose envelope length grows with n: where it crosses the limit is found below.
GROWING = {
    "bytes": lambda n: b"\x01" * n,
    "bytes-in-a-list": lambda n: [b"small", b"\x02" * n],
    "bytes-in-a-dict": lambda n: {"blob": b"\x03" * n},
    "floats": lambda n: [i + 0.5 for i in range(n)],  # a plain JSON list
    "tuples": lambda n: [(i, "x") for i in range(n)],  # wrapped leaves
    "ascii": lambda n: "a" * n,
    "japanese": lambda n: "日本語"[:1] * n,  # \\uXXXX escapes: 6 chars each
    "dict": lambda n: {f"k{i}": i for i in range(n)},
}


def _envelope_fits(value) -> bool:
    return len(sd.ExtendedTypeSerDes().serialize(value)) <= sd.ENVELOPE_MAX_CHARS


@pytest.mark.parametrize("kind", GROWING)
def test_default_pickles_what_is_past_the_reference_checkpoint_limit(kind):
    """The reference checkpoints nothing past 256 KiB (it stores a summary), so no envelope format
    binds there: such a value is pickled, not enveloped (base64 in JSON, a Python call per
    element: 10-30x slower both ways).  Up to the limit, the reference's envelope, byte for byte."""
    make = GROWING[kind]
    lo, hi = 0, 1
    while _envelope_fits(make(hi)):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the largest n whose envelope fits is lo
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _envelope_fits(make(mid)) else (lo, mid)
    for n in (lo - 1, lo, hi, hi + 1):
        value = make(n)
        data, back = round_trip(value)
        assert isinstance(data, str) == (n <= lo), (kind, n)
        if isinstance(data, str):
            assert data == sd.ExtendedTypeSerDes().serialize(value)
        else:
            assert data[:2] == b"\x80\x05"
        assert back == value and type(back) is type(value)
    parts = sd.serialize_parts(None, make(hi), what="result")  # what a worker sends: no envelope
    assert not isinstance(parts, str)


def test_default_reads_old_pickle_checkpoints():
    old = sd.PickleSerDes().serialize({"a": 1}, sd.SerDesContext())
    assert sd.deserialize(None, old, what="old checkpoint") == {"a": 1}


def test_numpy_array_round_trip():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    _, back = round_trip(array)
    assert back.dtype == np.float32 and back.shape == (3, 4)
    assert np.array_equal(back, array)


def test_dataclass_and_batch_result_round_trip():
    assert round_trip(Point(1, 2.5))[1] == Point(1, 2.5)
    r = batch()
    back = round_trip(r)[1]
    assert back == r and back.get_results() == [{"branch": 0, "attempt": 1}]


def test_lambda_and_closure_fall_back_to_cloudpickle():
    offset = 40

    def add(v):
        return v + offset

    value = {"f": lambda v: v * 2, "g": add}
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(value, protocol=5)
    _, back = round_trip(value)
    assert back["f"](21) == 42 and back["g"](2) == 42


def test_pickle_rejects_text_payload_with_a_clear_error():
    with pytest.raises(SerDesError, match="PickleSerDes expects bytes"):
        sd.deserialize(sd.PickleSerDes(), '{"a": 1}', what="result of step 'fetch'")


# --- error reporting --------------------------------------------------------------------


def test_serialize_failure_names_what_and_value_type():
    with pytest.raises(SerDesError) as info:
        sd.serialize(None, {"lock": threading.Lock()}, op_id="op1", what="result of step 'fetch'")
    message = str(info.value)
    assert "result of step 'fetch'" in message and "builtins.dict" in message
    assert "lock" in message  # the underlying reason is kept
    assert isinstance(info.value.__cause__, TypeError)


def test_json_serialize_failure_names_type():
    with pytest.raises(SerDesError) as info:
        sd.serialize(sd.JsonSerDes(), {1, 2}, what="result of branch 3")
    assert "result of branch 3" in str(info.value) and "builtins.set" in str(info.value)
    assert "JsonSerDes" in str(info.value)
    assert isinstance(info.value.__cause__, TypeError)


def test_deserialize_failure_names_what_and_payload():
    with pytest.raises(SerDesError) as info:
        sd.deserialize(None, b"not a pickle", what="input of map item 7")
    assert "input of map item 7" in str(info.value) and "12 bytes" in str(info.value)
    assert info.value.__cause__ is not None


def test_serdes_error_from_a_custom_serdes_is_wrapped_with_context():
    with pytest.raises(SerDesError) as info:
        sd.serialize(sd.ExtendedTypeSerDes(), Point(1, 2), what="result of step 's'")
    assert "result of step 's'" in str(info.value) and "Unsupported type" in str(info.value)
    assert isinstance(info.value.__cause__, SerDesError)


def test_retryable_serdes_error_passes_through():
    class Flaky(sd.SerDes):
        def serialize(self, value, serdes_context):
            raise RetryableSerDesError("try again")

        def deserialize(self, data, serdes_context):
            raise RetryableSerDesError("try again")

    with pytest.raises(RetryableSerDesError):
        sd.serialize(Flaky(), 1, what="x")
    with pytest.raises(RetryableSerDesError):
        sd.deserialize(Flaky(), "1", what="x")


def test_custom_serdes_receives_context():
    seen = []

    class Recording(sd.SerDes):
        def serialize(self, value, serdes_context):
            seen.append(serdes_context)
            return str(value)

        def deserialize(self, data, serdes_context):
            seen.append(serdes_context)
            return int(data)

    assert sd.deserialize(Recording(), sd.serialize(Recording(), 5, op_id="o", execution_id="e", what="x"),
                          op_id="o", execution_id="e", what="x") == 5
    assert seen == [sd.SerDesContext("o", "e")] * 2


def test_json_and_pass_through():
    assert round_trip({"a": [1, "b"]}, sd.JsonSerDes()) == ('{"a": [1, "b"]}', {"a": [1, "b"]})
    assert sd.PassThroughSerDes().serialize("raw", CTX) == "raw"
    assert sd.PassThroughSerDes().deserialize(b"raw", CTX) == b"raw"


# --- ExtendedTypeSerDes (the reference's envelope) ---------------------------------------

EXT = sd.ExtendedTypeSerDes()


@pytest.mark.parametrize(("value", "wire"), [("5 6", '"5 6"'), ([1, 2], "[1,2]"), (None, "null"),
                                             (3.5, "3.5"), (True, "true"), ([[1], ["a"]], '[[1],["a"]]')])
def test_primitives_are_plain_compact_json(value, wire):
    assert EXT.serialize(value, CTX) == wire
    assert EXT.deserialize(wire, CTX) == value


def test_everything_else_is_enveloped_recursively():
    assert EXT.serialize({"branch": 2, "ok": True}, CTX) == (
        '{"t":"m","v":{"branch":{"t":"i","v":2},"ok":{"t":"b","v":true}}}'
    )
    assert EXT.serialize((1, None), CTX) == '{"t":"t","v":[{"t":"i","v":1},{"t":"n","v":null}]}'
    assert EXT.serialize([1, {"a": "x"}], CTX) == (
        '{"t":"l","v":[{"t":"i","v":1},{"t":"m","v":{"a":{"t":"s","v":"x"}}}]}'
    )


def test_every_tag_round_trips():
    value = {
        "bytes": b"\x00\xffdata",
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "decimal": Decimal("1.10"),
        "datetime": datetime(2026, 11, 26, 12, 30, tzinfo=timezone.utc),
        "naive": datetime(2026, 1, 2, 3, 4, 5),
        "date": date(2026, 11, 26),
        "tuple": (1, "two", (3.0,)),
        "list": [b"x", {"nested": [None, False]}],
        "float": 1.5,
    }
    wire = EXT.serialize(value, CTX)
    tags = {"B", "u", "d", "dt", "D", "t", "l", "m", "f", "n", "b", "s", "i"}
    assert all(f'"t":"{tag}"' in wire for tag in tags)
    back = EXT.deserialize(wire, CTX)
    assert back == value and type(back["tuple"]) is tuple and type(back["decimal"]) is Decimal


def test_utc_z_suffix_is_accepted():
    noon_utc = datetime(2026, 11, 26, 12, tzinfo=timezone.utc)
    assert EXT.deserialize('{"t":"dt","v":"2026-11-26T12:00:00Z"}', CTX) == noon_utc


def test_batch_result_uses_br_tag():
    wire = EXT.serialize(batch(), CTX)
    assert wire.startswith('{"t":"br","v":{"all":{"t":"l","v":[{"t":"m","v":{"index":{"t')
    back = EXT.deserialize(wire, CTX)
    assert back == batch() and back.all[1].error.message == "branch 1 exploded"


@pytest.mark.parametrize(
    ("value", "message"),
    [(Point(1, 2), "Unsupported type"), ({(1, 2): "x"}, "Tuple keys not supported"), ({1, 2}, "Unsupported type")],
)
def test_unsupported_values(value, message):
    with pytest.raises(SerDesError, match=message):
        EXT.serialize(value, CTX)


@pytest.mark.parametrize(
    ("wire", "message"),
    [('{"a": 1}', "Malformed envelope"), ('{"t":"zz","v":1}', "Unknown type tag"), ('{"t":"l","v":3}', "expects list")],
)
def test_malformed_payloads(wire, message):
    with pytest.raises(SerDesError, match=message):
        EXT.deserialize(wire, CTX)


def test_extended_output_is_valid_json():
    """The envelope is JSON that says every type (a tuple is not a list), written as the reference writes it."""
    from aws_durable_execution_sdk_python.serdes import ExtendedTypeSerDes as ReferenceSerDes
    from aws_durable_execution_sdk_python.serdes import SerDesContext as ReferenceContext

    value = {"k": [1, (2, 3)], "s": "x", "n": None}
    text = EXT.serialize(value, CTX)
    assert json.loads(text) == {"t": "m", "v": {
        "k": {"t": "l", "v": [{"t": "i", "v": 1}, {"t": "t", "v": [{"t": "i", "v": 2}, {"t": "i", "v": 3}]}]},
        "s": {"t": "s", "v": "x"},
        "n": {"t": "n", "v": None},
    }}
    assert text == ReferenceSerDes().serialize(value, ReferenceContext("op", "arn"))
    back = EXT.deserialize(text, CTX)
    assert back == value and type(back["k"][1]) is tuple


def test_out_of_band_payloads_round_trip_into_private_writable_arrays():
    import numpy as np

    from durable_mp.core.records import OpRecord, result_view
    from durable_mp.serdes import PickleSerDes, SerDesContext, pickle_parts, unpickle

    value = {"big": np.arange(100_000, dtype=np.float64), "small": [1, "two"]}
    parts = pickle_parts(value)
    assert len(parts) > 2, "the array's buffer travels outside the pickle"
    assert any(memoryview(p).nbytes == value["big"].nbytes for p in parts)
    data = parts.join()
    back = unpickle(data)
    assert back["small"] == [1, "two"] and np.array_equal(back["big"], value["big"])
    back["big"][0] = 42.0  # writable, and not a view of the checkpoint bytes
    assert unpickle(data)["big"][0] == 0.0
    assert PickleSerDes().deserialize(data, SerDesContext()) ["small"] == [1, "two"]
    rec = OpRecord("a" * 64, "p", "CONTEXT", "MapIteration", "m", "SUCCEEDED", 1.0, 2.0, parts)
    raw = b"".join(rec.dumps_parts())
    assert raw == rec.dumps()
    assert np.array_equal(unpickle(result_view(raw))["big"], value["big"])
    assert OpRecord.loads(raw).result == data


def test_filesystem_serdes_writes_files_and_previews(tmp_path):
    """The reference's ``filesystem_serdes``: value in a file, envelope (with preview) inline."""
    from durable_mp.filesystem_serdes import FileSystemSerDes, FileSystemSerDesConfig, FileSystemSerDesMode
    from durable_mp.preview import PreviewConfig, PreviewField, PreviewMode, build_preview
    from durable_mp.serdes import EXTENDED_TYPES_SERDES, SerDesContext

    order = {"order_id": "O1", "email": "a@b.c", "items": [1, 2], "ship": {"city": "Seattle"}}
    config = PreviewConfig(PreviewMode.EXCLUDE_ALL, include=[PreviewField("order_id"), PreviewField("city")],
                           mask=[PreviewField("email")])
    assert build_preview(order, config) == {"order_id": "O1", "email": "***", "ship.city": "Seattle"}
    ctx = SerDesContext("op/1", "arn:x")
    fs = FileSystemSerDes(str(tmp_path), FileSystemSerDesConfig(generate_preview=lambda v: build_preview(v, config)))
    envelope = json.loads(fs.serialize(order, ctx))
    assert envelope["preview"]["email"] == "***"
    with open(envelope["file"]) as stored:
        assert EXTENDED_TYPES_SERDES.deserialize(stored.read()) == order
    assert fs.deserialize(json.dumps(envelope), ctx) == order
    inline = FileSystemSerDes(str(tmp_path / "o"), FileSystemSerDesConfig(storage_mode=FileSystemSerDesMode.OVERFLOW))
    small = inline.serialize({"a": 1}, ctx)
    assert "data" in json.loads(small) and inline.deserialize(small, ctx) == {"a": 1}
    assert not (tmp_path / "o").exists()
