"""Serializers for checkpointed values.

durable_mp's default (``DefaultSerDes``) writes what the reference's default
``ExtendedTypeSerDes`` can represent *exactly* (JSON scalars, lists, tuples, str-keyed
dicts, bytes, UUID, Decimal, datetime, date, ``BatchResult``) as the reference's
``{"t","v"}`` envelope, byte for byte, so histories, ``show`` and the reference's payload
assertions read it; anything else (numpy arrays, dataclasses, int-keyed dicts, subclasses
of those types) falls back to pickle protocol 5.  The payload's type tells them apart on
reading: ``str`` is an envelope, ``bytes`` a pickle.  Plain pickle is tried first (fast,
by reference); only what it refuses (lambdas, closures, classes defined in ``__main__``
of a notebook) goes through cloudpickle, by value.

The module-level ``serialize``/``deserialize`` are what the engine calls: ``None`` picks
the default, and every failure becomes a ``SerDesError`` naming what was being
(de)serialized, e.g. "result of step 'fetch'".  The interface (``SerDes``,
``SerDesContext``) is defined in ``core.serdes_base``, below ``config``, which names it.
"""

from __future__ import annotations

import base64
import json
import math
import pickle
import struct
import uuid
from collections.abc import Callable
from datetime import date, datetime, timezone
from decimal import Decimal
from json.decoder import scanstring  # type: ignore[attr-defined]  # public since 2.6, not in typeshed
from json.encoder import encode_basestring_ascii
from typing import Any, TypeVar

import cloudpickle

from durable_mp.concurrency.models import BatchResult
from durable_mp.core.serdes_base import Payload, SerDes, SerDesContext
from durable_mp.core.text import safe_str, type_name
from durable_mp.core.vocabulary import PICKLE_PROTOCOL
from durable_mp.exceptions import RetryableSerDesError, SerDesError

__all__ = [
    "DEFAULT_SERDES", "DefaultSerDes", "ExtendedTypeSerDes", "JsonSerDes", "PassThroughSerDes", "Payload",
    "PickleSerDes", "SerDes", "SerDesContext", "deserialize", "serialize",
]

T = TypeVar("T")

MAX_PAYLOAD_BYTES = 1 << 30  # one checkpointed value; LMDB and the worker pipe take more, RAM may not


class PassThroughSerDes(SerDes[T]):
    """Stores the value as given (it must already be ``str`` or ``bytes``)."""

    def serialize(self, value: T, serdes_context: SerDesContext) -> Payload:
        return value  # type: ignore[return-value]

    def deserialize(self, data: Payload, serdes_context: SerDesContext) -> T:
        return data  # type: ignore[return-value]


class JsonSerDes(SerDes[T]):
    """Plain ``json.dumps``/``json.loads``."""

    def serialize(self, value: T, serdes_context: SerDesContext) -> str:
        return json.dumps(value)

    def deserialize(self, data: Payload, serdes_context: SerDesContext) -> T:
        return json.loads(data)


class PickleSerDes(SerDes[T]):
    """Pickle protocol 5, falling back to cloudpickle for what plain pickle refuses."""

    def serialize(self, value: T, serdes_context: SerDesContext) -> bytes:
        try:
            return pickle.dumps(value, protocol=PICKLE_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError):
            return cloudpickle.dumps(value, protocol=PICKLE_PROTOCOL)

    def deserialize(self, data: Payload, serdes_context: SerDesContext) -> T:
        if isinstance(data, str):
            raise TypeError("PickleSerDes expects bytes, got str (was it written by a JSON serdes?)")
        return unpickle(data)


# -- large values: pickle protocol 5 with the buffers outside the pickle stream ----------------
# A payload in this layout is MAGIC | header length | buffer count | buffer lengths | pickle
# header | buffers.  It lets a worker send a numpy result straight from the array's memory
# (``pickle_parts``) instead of copying it into a pickle first.  A plain pickle starts with
# b"\x80", so the two layouts cannot be confused.
OOB_MAGIC = _OOB_MAGIC = b"\x00DMP5OOB"
_OOB_HEAD = struct.Struct("<QI")


class Parts(list):
    """A payload as a list of buffers; their concatenation is the payload's bytes."""

    @property
    def nbytes(self) -> int:
        return sum(map(len, self))  # bytes, or PickleBuffer.raw() views (1-D, unsigned bytes)

    def join(self) -> bytes:
        return b"".join(self)


def pickle_parts(value: Any) -> bytes | Parts:
    """``value`` pickled (protocol 5) with large buffers left where they are, not copied.

    A value without such buffers (almost every value) comes back as plain ``bytes``.
    """
    buffers: list[pickle.PickleBuffer] = []
    try:
        header = pickle.dumps(value, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append)
    except (pickle.PicklingError, TypeError, AttributeError):
        return cloudpickle.dumps(value, protocol=PICKLE_PROTOCOL)
    if not buffers:
        return header
    try:
        raws = [buf.raw() for buf in buffers]
    except BufferError:  # a non-contiguous buffer: keep it inside the pickle
        return pickle.dumps(value, protocol=PICKLE_PROTOCOL)
    lengths = [raw.nbytes for raw in raws]
    meta = _OOB_MAGIC + _OOB_HEAD.pack(len(header), len(raws)) + struct.pack(f"<{len(raws)}Q", *lengths)
    return Parts([meta, header, *raws])


def unpickle(data: Any) -> Any:
    """Load a plain pickle or a ``pickle_parts`` payload; buffers are private, writable copies."""
    if data[: len(_OOB_MAGIC)] != _OOB_MAGIC:  # a plain pickle (every small value)
        return pickle.loads(data)
    view = memoryview(data)
    offset = len(_OOB_MAGIC)
    header_len, count = _OOB_HEAD.unpack_from(view, offset)
    offset += _OOB_HEAD.size
    lengths = struct.unpack_from(f"<{count}Q", view, offset)
    offset += 8 * count
    header = view[offset:offset + header_len]
    offset += header_len
    buffers = []
    for length in lengths:
        buffers.append(bytearray(view[offset:offset + length]))
        offset += length
    return pickle.loads(header, buffers=buffers)


def serialize_parts(serdes: SerDes | None, value: Any, *, op_id: str = "", execution_id: str = "",
                    what: str) -> Payload | Parts:
    """Like ``serialize``, but pickling leaves large buffers uncopied (``Parts``)."""
    if serdes is None or serdes.__class__ is DefaultSerDes:
        text = envelope_of(value)
        if text is not None:
            _check_size(len(text), what, value)
            return text
    elif serdes.__class__ is not PickleSerDes:
        return serialize(serdes, value, op_id=op_id, execution_id=execution_id, what=what)
    try:
        parts = pickle_parts(value)
    except Exception as error:
        raise SerDesError(f"Cannot serialize {what} (value of type {_describe(value)}) with PickleSerDes: "
                          f"{type(error).__name__}: {safe_str(error)}") from error
    _check_size(parts.nbytes if isinstance(parts, Parts) else len(parts), what, value)
    return parts


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
        case BatchResult():
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


# -- the default: the reference's envelope where it is exact, pickle elsewhere ----------------
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
    elif cls is BatchResult:
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


class DefaultSerDes(SerDes[Any]):
    """The reference's envelope (a ``str``) where it is exact, else pickle (``bytes``)."""

    def serialize(self, value: Any, serdes_context: SerDesContext | None = None) -> Payload:
        text = envelope_of(value)
        return text if text is not None else PICKLE_SERDES.serialize(value, serdes_context or SerDesContext())

    def deserialize(self, data: Payload, serdes_context: SerDesContext | None = None) -> Any:
        if data.__class__ is str:
            return decode_envelope(data)
        return unpickle(data)


PICKLE_SERDES: SerDes[Any] = PickleSerDes()
DEFAULT_SERDES: SerDes[Any] = DefaultSerDes()
# The reference's module-level instances, for code that names them.
DEFAULT_JSON_SERDES: SerDes[Any] = JsonSerDes()
EXTENDED_TYPES_SERDES: SerDes[Any] = ExtendedTypeSerDes()


def _describe(data: Any) -> str:
    size = f", {len(data)} bytes" if isinstance(data, bytes | bytearray | memoryview) else ""
    return f"{type(data).__module__}.{type(data).__qualname__}{size}"


def serialize(
    serdes: SerDes | None, value: Any, *, op_id: str = "", execution_id: str = "", what: str
) -> Payload:
    """Serialize ``value`` (``what`` it is names it in errors) with ``serdes`` or the default."""
    active = serdes if serdes is not None else DEFAULT_SERDES
    try:
        payload = active.serialize(value, SerDesContext(op_id, execution_id))
    except RetryableSerDesError:
        raise
    except Exception as error:
        raise SerDesError(
            f"Cannot serialize {what} (value of type {_describe(value)}) with "
            f"{type(active).__name__}: {type(error).__name__}: {safe_str(error)}"
        ) from error
    if payload.__class__ is not str and payload.__class__ is not bytes:
        payload = _as_payload(payload, active, what)
    _check_size(len(payload), what, value)
    return payload


def _as_payload(payload: Any, serdes: SerDes, what: str) -> Payload:
    """A custom serializer's output as the exact ``str`` or ``bytes`` a checkpoint holds.

    Anything else (a dict, an int, a list that the engine would take for buffers) is the
    serializer's bug, refused here as a ``SerDesError`` that names it, before the engine
    tries to pickle or join it far from the user's code.
    """
    if isinstance(payload, str):  # a subclass would be pickled as the user's class
        return str.__getitem__(payload, slice(None))
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    raise SerDesError(f"Cannot serialize {what}: {type(serdes).__name__}.serialize returned "
                      f"{type_name(payload)}, a checkpoint holds str or bytes")


def _check_size(size: int, what: str, value: Any) -> None:
    if size > MAX_PAYLOAD_BYTES:
        raise SerDesError(
            f"Cannot checkpoint {what}: it serializes to {size / 2**20:.1f} MiB, over the "
            f"{MAX_PAYLOAD_BYTES / 2**20:.0f} MiB limit of one checkpoint (value of type {_describe(value)}); "
            f"return a path or a summary instead"
        )


def deserialize(
    serdes: SerDes | None, data: Payload, *, op_id: str = "", execution_id: str = "", what: str
) -> Any:
    """Deserialize ``data`` (``what`` it holds names it in errors) with ``serdes`` or the default."""
    active = serdes if serdes is not None else DEFAULT_SERDES
    try:
        return active.deserialize(data, SerDesContext(op_id, execution_id))
    except RetryableSerDesError:
        raise
    except Exception as error:
        raise SerDesError(
            f"Cannot deserialize {what} (payload of type {_describe(data)}) with "
            f"{type(active).__name__}: {type(error).__name__}: {safe_str(error)}"
        ) from error
