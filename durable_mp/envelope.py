"""The reference SDK's ``{"t", "v"}`` JSON envelope: ``ExtendedTypeSerDes`` and the fast path of the default.

``ExtendedTypeSerDes`` writes what the reference's default serializer writes, byte for
byte.  ``envelope_of`` answers whether a value's envelope brings it back exactly (same
types, equal) and is short enough, before encoding a large value, so ``serdes.DefaultSerDes``
pickles the rest; ``decode_envelope`` reads a payload back with fast paths for ints and
plain strings.
"""

from __future__ import annotations

import base64
import json
import math
import sys
import uuid
from collections.abc import Callable
from datetime import date, datetime, timezone
from decimal import Decimal
from json.decoder import scanstring  # type: ignore[attr-defined]  # public since 2.6, not in typeshed
from json.encoder import encode_basestring_ascii
from typing import Any, TypeVar

from durable_mp.core.serdes_base import Payload, SerDes, SerDesContext
from durable_mp.exceptions import SerDesError

_BATCH_MODULE = "durable_mp.concurrency.models"


def _batch_result_class() -> type | None:
    """``BatchResult`` if its module is loaded, else None: no value can be one before it is.

    Not imported here: a worker encodes its branches' results with this module, and a
    branch that never builds a BatchResult should not pay for the concurrency models
    (and the configs they import) at its start (issue 23 target 4).
    """
    module = sys.modules.get(_BATCH_MODULE)
    return None if module is None else getattr(module, "BatchResult", None)


def _is_batch_result(obj: Any) -> bool:
    cls = _batch_result_class()
    return cls is not None and isinstance(obj, cls)

__all__ = ["ENVELOPE_MAX_CHARS", "ExtendedTypeSerDes", "decode_envelope", "envelope_of"]

T = TypeVar("T")


_TYPE, _VALUE = "t", "v"  # envelope keys of ExtendedTypeSerDes: {"t": tag, "v": value}


class _Tag:
    """Envelope tags, as written by the reference SDK."""

    NONE, STR, INT, FLOAT, BOOL = "n", "s", "i", "f", "b"
    BYTES, UUID, DECIMAL, DATETIME, DATE = "B", "u", "d", "dt", "D"
    TUPLE, LIST, DICT, BATCH_RESULT = "t", "l", "m", "br"


_SCALAR_DECODERS: dict[str, Callable[[Any], Any]] = {
    _Tag.NONE: lambda v: None, _Tag.STR: str, _Tag.INT: int, _Tag.FLOAT: float, _Tag.BOOL: bool,
}


def _wrap(tag: str, value: Any) -> dict[str, Any]:
    return {_TYPE: tag, _VALUE: value}


def _encode(obj: Any) -> dict[str, Any]:
    """Wrap ``obj`` (recursively) in tagged envelopes."""
    match obj:
        case None:
            return _wrap(_Tag.NONE, None)
        case bool():  # before int: bool is an int
            return _wrap(_Tag.BOOL, obj)
        case str():
            return _wrap(_Tag.STR, obj)
        case int():
            return _wrap(_Tag.INT, obj)
        case float():
            return _wrap(_Tag.FLOAT, obj)
        case bytes() | bytearray() | memoryview():
            return _wrap(_Tag.BYTES, base64.b64encode(bytes(obj)).decode("ascii"))
        case uuid.UUID():
            return _wrap(_Tag.UUID, str(obj))
        case Decimal():
            return _wrap(_Tag.DECIMAL, str(obj))
        case datetime():  # before date: datetime is a date
            return _wrap(_Tag.DATETIME, obj.isoformat())
        case date():
            return _wrap(_Tag.DATE, obj.isoformat())
        case _ if _is_batch_result(obj):
            return _wrap(_Tag.BATCH_RESULT, _encode(obj.to_dict())[_VALUE])
        case list():
            return _wrap(_Tag.LIST, [_encode(v) for v in obj])
        case tuple():
            return _wrap(_Tag.TUPLE, [_encode(v) for v in obj])
        case dict():
            if any(isinstance(key, tuple) for key in obj):
                raise SerDesError("Tuple keys not supported")
            return _wrap(_Tag.DICT, {k: _encode(v) for k, v in obj.items()})
    raise SerDesError(f"Unsupported type: {type(obj)}")


def _decode_child(obj: Any) -> Any:
    if isinstance(obj, dict) and _TYPE in obj and _VALUE in obj:
        return _decode(obj[_TYPE], obj[_VALUE])
    return obj


def _expect(value: Any, kind: type, tag: str) -> Any:
    if not isinstance(value, kind):
        raise SerDesError(f"Tag {tag!r} expects {kind.__name__}, got {type(value).__name__}")
    return value


def _decode(tag: str, value: Any) -> Any:
    scalar = _SCALAR_DECODERS.get(tag)
    if scalar is not None:
        return scalar(value)
    match tag:
        case _Tag.BYTES:
            return base64.b64decode(value.encode("ascii"))
        case _Tag.UUID:
            return uuid.UUID(value)
        case _Tag.DECIMAL:
            return Decimal(value)
        case _Tag.DATETIME:
            text = value[:-1] + "+00:00" if value.endswith("Z") else value
            return datetime.fromisoformat(text)
        case _Tag.DATE:
            return date.fromisoformat(value)
        case _Tag.LIST:
            return [_decode_child(v) for v in _expect(value, list, tag)]
        case _Tag.TUPLE:
            return tuple(_decode_child(v) for v in _expect(value, list, tag))
        case _Tag.DICT:
            return {k: _decode_child(v) for k, v in _expect(value, dict, tag).items()}
        case _Tag.BATCH_RESULT:
            from durable_mp.concurrency.models import BatchResult

            return BatchResult.from_dict(_decode(_Tag.DICT, value))
    raise SerDesError(f'Unknown type tag: "{tag}"')


class ExtendedTypeSerDes(SerDes[T]):
    """The reference's default: compact JSON with ``{"t", "v"}`` type envelopes.

    Scalars and lists of scalars are plain JSON; everything else is tagged
    recursively.  Types it cannot express (dataclasses, custom classes) raise
    ``SerDesError("Unsupported type: ...")``.
    """

    def serialize(self, value: T, serdes_context: SerDesContext | None = None) -> str:
        wire = value if SerDes.is_primitive(value) else _encode(value)
        return json.dumps(wire, separators=(",", ":"))

    def deserialize(self, data: Payload, serdes_context: SerDesContext | None = None) -> T:
        obj = json.loads(data)
        if SerDes.is_primitive(obj):
            return obj
        if not (isinstance(obj, dict) and _TYPE in obj and _VALUE in obj):
            raise SerDesError('Malformed envelope: missing "t" or "v" at root.')
        return _decode(obj[_TYPE], obj[_VALUE])


# -- the fast path of DefaultSerDes: the envelope where it is exact --------------------------
# Exact types only: a subclass (IntEnum, OrderedDict, a str subclass) would come back as its
# base type from JSON, so it is pickled instead.
_ENVELOPE_LEAVES = frozenset({uuid.UUID, Decimal, date})
# The reference checkpoints no value whose payload is past 256 KiB (it stores a summary), so
# no envelope format binds beyond that: such values are pickled.  Base64 in JSON, a Python
# call per wrapped element and 6-char escapes of non-ASCII text made them 10-30x slower to
# write and read than pickle (a 64 MB bytes result moved at about 30 MB/s).
ENVELOPE_MAX_CHARS = 256 * 1024
_dumps_compact = json.JSONEncoder(separators=(",", ":")).encode  # what the reference's json.dumps writes


def _room_after(obj: Any, room: int) -> int:
    """``room`` less a lower bound of the length of ``obj``'s envelope, or -1 if that is past
    ``room`` or the envelope would not bring ``obj`` back equal and of the same types.

    The bound holds for both forms a value can take (plain JSON lists, tagged envelopes): at
    least one character and a separator per scalar, the text of a str, base64 of bytes.  It
    lets a large value be sent to pickle before any of it is encoded.
    """
    cls = obj.__class__
    if cls is str:
        room -= len(obj) + 2
    elif cls in _SCALAR_JSON or cls in _ENVELOPE_LEAVES:
        room -= 2
    elif cls is bytes:
        room -= 4 * (len(obj) // 3) + 2
    elif cls is list or cls is tuple:
        room -= 2
        for item in obj:
            room = _room_after(item, room)
            if room < 0:
                return -1
    elif cls is dict:
        room -= 2
        for key, value in obj.items():
            if key.__class__ is not str:
                return -1
            room = _room_after(value, room - len(key) - 3)
            if room < 0:
                return -1
    elif cls is datetime:  # a zoneinfo zone would come back as a fixed offset
        if not (obj.tzinfo is None or obj.tzinfo.__class__ is timezone):
            return -1
        room -= 2
    elif cls is _batch_result_class():
        room = _room_after(obj.to_dict(), room)
    else:
        return -1
    return room if room >= 0 else -1


_EXTENDED: ExtendedTypeSerDes[Any] = ExtendedTypeSerDes()
_NUMBER_START = frozenset("-0123456789")


def decode_envelope(text: str) -> Any:
    """A str payload of ``DefaultSerDes``; ints and plain strings without ``json.loads``'s overhead."""
    first = text[:1]
    if first in _NUMBER_START:
        try:
            return int(text)
        except ValueError:  # a float
            pass
    elif first == '"':
        value, end = scanstring(text, 1)
        if end == len(text):
            return value
    return _EXTENDED.deserialize(text)


def _float_json(value: float) -> str:
    return float.__repr__(value) if math.isfinite(value) else _dumps_compact(value)  # json's floatstr


# What ``json.dumps`` writes for a scalar, without its per-call encoder set-up: a map's
# per-item cost (measured: ~6 us through json.dumps, ~0.3-1 us here).
_SCALAR_JSON: dict[type, Callable[[Any], str]] = {
    int: int.__repr__,  # ValueError past Python's int digit limit: pickled instead
    str: encode_basestring_ascii,
    float: _float_json,
    bool: {True: "true", False: "false"}.__getitem__,
    type(None): lambda _: "null",
}


def envelope_of(value: Any) -> str | None:
    """The reference's ``ExtendedTypeSerDes`` payload of ``value``, or None where it is not exact
    or longer than ``ENVELOPE_MAX_CHARS`` (then the value is pickled).

    A JSON scalar (most map results) is one dict look-up and one C call.
    """
    try:
        scalar = _SCALAR_JSON.get(value.__class__)
        if scalar is not None:
            text = scalar(value)
        elif _room_after(value, ENVELOPE_MAX_CHARS) < 0:
            return None
        else:
            text = _EXTENDED.serialize(value)
    except (ValueError, RecursionError, SerDesError):  # an int past JSON's digit limit, a cycle
        return None
    return text if len(text) <= ENVELOPE_MAX_CHARS else None
