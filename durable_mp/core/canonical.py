"""A canonical byte encoding of plain values: the same bytes in every process.

The default execution id hashes the event, so re-running the same command finds the
same execution.  That needs an encoding that does not depend on the process: ``repr``
of a set follows ``PYTHONHASHSEED``, a default ``repr`` holds an address, pickle bytes
depend on protocol and memo.  This module encodes a closed set of types, each by value:

- ``None``, ``bool``, ``int`` (in hex), ``float`` (by ``repr``: ``-0.0``, ``nan`` and ``inf`` are
  distinct), ``str``, ``bytes``, ``bytearray``;
- ``list`` and ``tuple`` (distinct), ``dict`` (items ordered by the encoding of their
  keys), ``set`` and ``frozenset`` (elements ordered by their encoding);
- ``datetime``, ``date``, ``time`` (ISO format, with the UTC offset when aware),
  ``Decimal``, ``UUID``, paths, ``Enum`` members (their class and value), dataclass
  instances (their class and fields).

Anything else raises ``NotCanonicalError`` naming the type and where it sits.

A value made only of JSON's own types (``dict`` with ``str`` keys, ``list``, ``str``,
``int``, ``float``, ``bool``, ``None``) is encoded as sorted JSON text, the encoding
default ids have always used for such events, so their ids did not change.  Every other
value is encoded with one type tag per item; it starts with a NUL byte, which JSON text
never does, so the two cannot collide.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import pathlib
import uuid
from typing import Any

TAGGED_PREFIX = b"\x00canonical-1\x00"  # version of the tagged encoding; JSON text never starts with NUL

_JSON_SCALARS = (str, int, float, bool, type(None))


class NotCanonicalError(TypeError):
    """A value this module cannot encode the same way in every process."""

    def __init__(self, type_name: str, where: str, why: str = "has no canonical encoding") -> None:
        super().__init__(f"{where} (of type {type_name}) {why}")
        self.type_name = type_name
        self.where = where


def canonical_bytes(value: Any, where: str = "value") -> bytes:
    """``value`` encoded canonically; ``where`` names it in errors (``event`` -> ``event['k'][0]``)."""
    out: list[bytes] = [TAGGED_PREFIX]
    try:
        _encode(value, where, out, set())  # first: it refuses what cannot be encoded, cycles included
    except RecursionError:
        raise NotCanonicalError(_type_name(value), where, "is nested too deeply") from None
    if _is_plain_json(value):
        try:
            return json.dumps(value, sort_keys=True).encode()
        except ValueError:  # an int past Python's digit limit: keep the tagged encoding (hex)
            pass
    return b"".join(out)


def _is_plain_json(value: Any) -> bool:
    """Only JSON's own types (exactly: no subclasses, no tuples, no non-str keys); no cycles here."""
    kind = type(value)
    if kind in _JSON_SCALARS:
        return True
    if kind is list:
        return all(_is_plain_json(v) for v in value)
    if kind is dict:
        return all(type(k) is str and _is_plain_json(v) for k, v in value.items())
    return False


def _sized(tag: bytes, data: bytes) -> bytes:
    """``tag`` + length + ``:`` + data: self-delimiting, so concatenations are unambiguous."""
    return tag + str(len(data)).encode() + b":" + data


def _text(tag: bytes, text: str) -> bytes:
    return _sized(tag, text.encode("utf-8", "surrogatepass"))


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _encode(value: Any, where: str, out: list[bytes], path: set[int]) -> None:
    """Append the encoding of ``value``; ``path`` holds the containers being encoded (cycles)."""
    if value is None:
        out.append(b"N")
    elif value is True or value is False:
        out.append(b"T" if value else b"F")
    elif isinstance(value, enum.Enum):  # before int and str: IntEnum, StrEnum
        out.append(_text(b"e", _type_name(value)))
        _encode(value.value, f"{where}.value", out, path)
    elif isinstance(value, int):
        out.append(_text(b"i", int.__format__(value, "x")))  # hex: no digit limit (sys.set_int_max_str_digits)
    elif isinstance(value, float):
        out.append(_text(b"f", float.__repr__(value)))
    elif isinstance(value, str):
        out.append(_text(b"s", str.__str__(value)))
    elif isinstance(value, bytes):
        out.append(_sized(b"b", bytes(value)))
    elif isinstance(value, bytearray):
        out.append(_sized(b"B", bytes(value)))
    elif isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        tag = b"D" if isinstance(value, datetime.datetime) else b"a" if isinstance(value, datetime.date) else b"m"
        out.append(_text(tag, value.isoformat()))
    elif isinstance(value, decimal.Decimal):
        out.append(_text(b"c", str(value)))
    elif isinstance(value, uuid.UUID):
        out.append(_text(b"u", str(value)))
    elif isinstance(value, pathlib.PurePath):
        out.append(_text(b"p", str(value)))
    elif isinstance(value, (list, tuple, dict, set, frozenset)) or _is_dataclass_instance(value):
        if id(value) in path:
            raise NotCanonicalError(_type_name(value), where, "contains itself")
        path.add(id(value))
        try:
            _encode_container(value, where, out, path)
        finally:
            path.discard(id(value))
    else:
        raise NotCanonicalError(_type_name(value), where)


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _encode_container(value: Any, where: str, out: list[bytes], path: set[int]) -> None:
    if isinstance(value, (list, tuple)):
        out.append((b"l" if isinstance(value, list) else b"t") + str(len(value)).encode() + b":")
        for i, item in enumerate(value):
            _encode(item, f"{where}[{i}]", out, path)
    elif isinstance(value, dict):
        items = []
        for key, item in value.items():
            key_bytes = _one(key, f"key {key!r} of {where}", path)
            items.append((key_bytes, _one(item, f"{where}[{key!r}]", path)))
        items.sort()
        out.append(b"d" + str(len(items)).encode() + b":")
        for key_bytes, item_bytes in items:
            out.append(key_bytes)
            out.append(item_bytes)
    elif isinstance(value, (set, frozenset)):
        tag = b"z" if isinstance(value, frozenset) else b"S"
        elements = sorted(_one(item, f"an element of {where}", path) for item in value)
        out.append(tag + str(len(elements)).encode() + b":")
        out.extend(elements)
    else:  # a dataclass instance: its class, then its fields in definition order
        fields = dataclasses.fields(value)
        out.append(_text(b"o", _type_name(value)) + str(len(fields)).encode() + b":")
        for field in fields:
            out.append(_text(b"s", field.name))
            _encode(getattr(value, field.name), f"{where}.{field.name}", out, path)


def _one(value: Any, where: str, path: set[int]) -> bytes:
    """The encoding of one item on its own, to sort by."""
    out: list[bytes] = []
    _encode(value, where, out, path)
    return b"".join(out)


__all__ = ["NotCanonicalError", "canonical_bytes"]
