"""Decode the result in a plain success's record bytes without building an ``OpRecord``.

Used where a default-serdes batch turns many stored item records into values: a resumed
million-item map decodes half a million compact records when its BatchResult is built.
Anything unusual (another layout, a payload that will not load here) answers ``UNREAD``
and the caller takes its general path, which reports errors with their context.
"""

from __future__ import annotations

import pickle
from typing import Any

from durable_mp.core.records import result_span, result_view
from durable_mp.serdes import OOB_MAGIC, DefaultSerDes, PickleSerDes, decode_envelope, unpickle

UNREAD: Any = object()
IN_STORE: Any = object()  # a replayed item whose record stays in the store until the result is built
COMPACT_ITEM = ord("I")  # first byte of a compact item record (``core.records.item_record``): a plain success


def fast_decodable(item_serdes: Any) -> bool:
    """The serdes reads what the default formats wrote (pickle bytes, the JSON envelope)."""
    return item_serdes is None or item_serdes.__class__ in (PickleSerDes, DefaultSerDes)


def success_value(data: Any) -> Any:
    """The value in a succeeded record's bytes (either format), or ``UNREAD``."""
    try:
        if data.__class__ is bytes:  # a small record: its result follows the header
            kind, start = result_span(data)
            payload = data[start:]
            if kind == b"S":  # the default serdes' JSON envelope
                return decode_envelope(payload.decode())
            if kind == b"N":  # no payload: the serdes decides what that means
                return UNREAD
            return unpickle(payload) if payload.startswith(OOB_MAGIC) else pickle.loads(payload)
        return unpickle(result_view(data))
    except Exception:  # noqa: BLE001 - the general path reports it with its context
        return UNREAD
