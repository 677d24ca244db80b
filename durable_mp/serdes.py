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

import json
import pickle
import struct
from typing import Any, TypeVar

from durable_mp.core.serdes_base import Payload, SerDes, SerDesContext
from durable_mp.core.text import safe_str, type_name
from durable_mp.core.vocabulary import PICKLE_PROTOCOL
from durable_mp.envelope import ENVELOPE_MAX_CHARS as ENVELOPE_MAX_CHARS  # re-exported: tests and callers name it here
from durable_mp.envelope import ExtendedTypeSerDes, decode_envelope, envelope_of
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


def _by_value(value: Any) -> bytes:
    """cloudpickle's stream of what plain pickle refused; imported on first use (a worker's start time)."""
    import cloudpickle

    data: bytes = cloudpickle.dumps(value, protocol=PICKLE_PROTOCOL)
    return data


class PickleSerDes(SerDes[T]):
    """Pickle protocol 5, falling back to cloudpickle for what plain pickle refuses."""

    def serialize(self, value: T, serdes_context: SerDesContext) -> bytes:
        try:
            return pickle.dumps(value, protocol=PICKLE_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError):
            return _by_value(value)

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
        return _by_value(value)
    if not buffers:
        return header
    try:
        raws = [buf.raw() for buf in buffers]
    except BufferError:  # a non-contiguous buffer: keep it inside the pickle
        return pickle.dumps(value, protocol=PICKLE_PROTOCOL)
    lengths = [raw.nbytes for raw in raws]
    meta = _OOB_MAGIC + _OOB_HEAD.pack(len(header), len(raws)) + struct.pack(f"<{len(raws)}Q", *lengths)
    return Parts([meta, header, *raws])


def padded(parts: Parts, pad: int) -> Parts:
    """``parts`` with ``pad`` zero bytes after the pickle header, so the buffers start ``pad`` bytes later.

    For alignment (``engine.result_blobs``): unpickling ignores bytes past a pickle's end.
    """
    meta, header = parts[0], parts[1]
    header_len, count = _OOB_HEAD.unpack_from(meta, len(_OOB_MAGIC))
    at = len(_OOB_MAGIC)
    meta = meta[:at] + _OOB_HEAD.pack(header_len + pad, count) + meta[at + _OOB_HEAD.size:]
    return Parts([meta, bytes(header) + bytes(pad), *parts[2:]])


def unpickle(data: Any, *, views: bool = False) -> Any:
    """Load a plain pickle or a ``pickle_parts`` payload; buffers are private, writable copies.

    ``views=True``: the buffers are views of ``data`` itself (no copy), for a ``data`` that
    is already the caller's private, writable memory (a copy-on-write mapping).
    """
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
        buffers.append(view[offset:offset + length] if views else bytearray(view[offset:offset + length]))
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


# -- the default: the reference's envelope where it is exact, pickle elsewhere ----------------
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
