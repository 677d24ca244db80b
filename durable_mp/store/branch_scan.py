"""Read every item record of one batch from LMDB in a few C-level passes (a resume of a big map).

A resumed million-item map reads half a million records before it can dispatch anything;
a Python loop over the cursor (a prefix test, a slice and an ``int`` per key) cost about
2 µs a record.  Here the cursor is drained with ``takewhile`` over a C comparison, keys
are parsed with ``map``, and the first bytes of all values are gathered into one
``bytes`` so callers can test every record's format without a loop of their own.
"""

from __future__ import annotations

from itertools import takewhile
from operator import itemgetter
from typing import Any

_KEY, _VALUE, _FIRST = itemgetter(0), itemgetter(1), itemgetter(0)


def scan_branches(txn: Any, db: Any, prefix: bytes) -> dict[int, Any]:
    """``{int(key[len(prefix):]): value}`` of the keys that start with ``prefix`` (a non-empty bytes).

    Every key under ``prefix`` sorts before ``end`` (prefix with its last byte + 1), and a
    ``(end,) > (key, value)`` tuple comparison is decided by the keys alone.
    """
    cur = txn.cursor(db=db)
    if not cur.set_range(prefix):
        return {}
    end = prefix[:-1] + bytes([prefix[-1] + 1]) if prefix[-1] < 0xFF else None
    if end is None:  # not a branch prefix ('#'); keep the plain loop for generality
        pairs = []
        for key, value in cur.iternext():
            if not key.startswith(prefix):
                break
            pairs.append((key, value))
    else:
        pairs = list(takewhile((end,).__gt__, cur.iternext()))
    indices = map(int, map(itemgetter(slice(len(prefix), None)), map(_KEY, pairs)))
    return dict(zip(indices, map(_VALUE, pairs), strict=True))


def first_bytes(values: Any) -> bytes:
    """The first byte of every value, in order (``values`` are non-empty bytes)."""
    return bytes(map(_FIRST, values))
