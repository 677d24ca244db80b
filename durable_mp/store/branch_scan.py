"""Read every item record of one batch from LMDB in a few C-level passes (a resume of a big map).

A resumed million-item map reads half a million records before it can dispatch anything;
a Python loop over the cursor (a prefix test, a slice and an ``int`` per key) cost about
2 µs a record.  Here the cursor is drained with ``takewhile`` over a C comparison, keys
are read as runs of consecutive indices (``key_indices``), and the first bytes of all values are gathered into one
``bytes`` so callers can test every record's format without a loop of their own.
"""

from __future__ import annotations

from itertools import islice, takewhile
from operator import itemgetter
from typing import Any

from durable_mp.core.records import branch_key

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
    indices = key_indices(list(map(_KEY, pairs)), len(prefix))
    return dict(zip(indices, map(_VALUE, pairs), strict=True))


_RUN_LEAF = 64  # below this many keys a span is parsed key by key


def key_indices(keys: list[bytes], start: int) -> list[int]:
    """``[int(key[start:]) for key in keys]`` for sorted, distinct keys, parsing only a few of them.

    A resumed map's finished items are long consecutive runs.  When every key has the
    same length (``branch_key``'s fixed width), sorted keys are sorted numbers, so a span
    whose first and last numbers are as far apart as its length is exactly that range:
    the span is split in halves until it is one, about two parses per run instead of one
    per key.
    """
    if not keys:
        return []
    if len(set(map(len, keys))) != 1:  # not fixed width: byte order is not number order
        return list(map(int, map(itemgetter(slice(start, None)), keys)))
    out: list[int] = []
    todo = [(0, len(keys))]
    while todo:
        lo, hi = todo.pop()
        first, last = int(keys[lo][start:]), int(keys[hi - 1][start:])
        if last - first == hi - lo - 1:
            out.extend(range(first, last + 1))
        elif hi - lo <= _RUN_LEAF:
            out.extend(map(int, map(itemgetter(slice(start, None)), keys[lo:hi])))
        else:
            mid = (lo + hi) // 2
            todo.append((mid, hi))  # popped after the lower half: ``out`` stays in key order
            todo.append((lo, mid))
    return out


def first_bytes(values: Any) -> bytes:
    """The first byte of every value, in order (``values`` are non-empty bytes)."""
    return bytes(map(_FIRST, values))


def scan_outcomes(txn: Any, db: Any, prefix: bytes, plain: int) -> tuple[list[int], dict[int, Any]]:
    """``(indices whose value starts with the byte plain, {index: value} of the others)``.

    A resume needs only to know which items ended as plain successes (compact records,
    first byte ``plain``); their values stay in the store until the result is built.
    Keys come from one key-only pass, first bytes from a second pass in which each
    value is dropped as soon as its first byte is read.
    """
    cur = txn.cursor(db=db)
    if not cur.set_range(prefix) or prefix[-1] == 0xFF:
        return [], {}
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    keys = list(takewhile(end.__gt__, cur.iternext(keys=True, values=False)))
    indices = key_indices(keys, len(prefix))
    cur.set_range(prefix)
    firsts = bytes(map(_FIRST, islice(cur.iternext(keys=False, values=True), len(keys))))
    if firsts.count(plain) == len(firsts):
        return indices, {}
    compact = [i for i, first in zip(indices, firsts, strict=True) if first == plain]
    others = {i: txn.get(key, db=db) for i, key, first in zip(indices, keys, firsts, strict=True) if first != plain}
    return compact, others


def read_each(txn: Any, db: Any, parent: bytes, indices: Any, fn: Any) -> None:
    """``fn(index, value)`` for the stored record of each item of ``indices`` (keys under ``parent``), in one read."""
    get = txn.get
    for index in indices:
        fn(index, get(parent + branch_key(index).encode(), db=db))
