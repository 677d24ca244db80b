"""C-level loops over per-item state bytes (a ``bytearray`` per batch, one byte per item).

A resume of a million-item map marks half a million items at once; a Python loop costs
~100 ns an item, ``map`` over ``bytearray.__setitem__`` drained by a zero-length deque
about a fifth of that.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from itertools import compress, repeat


def fill_at(states: bytearray, indices: Iterable[int], value: int) -> None:
    """``states[i] = value`` for every ``i`` in ``indices`` (bounds checked by the bytearray)."""
    deque(map(states.__setitem__, indices, repeat(value)), maxlen=0)


def mask(value: int) -> bytes:
    """A ``bytes.translate`` table: ``value`` -> 1, any other byte -> 0."""
    return bytes(1 if b == value else 0 for b in range(256))


def positions(states: bytes | bytearray, table: bytes) -> list[int]:
    """Indices whose byte ``table`` (from ``mask``) maps to 1, in order."""
    return list(compress(range(len(states)), states.translate(table)))
