"""Index lists that are one consecutive run: the shape of almost every map chunk.

Per-item state lives in a ``bytearray`` (a batch's item table, ``concurrency.item_table``); a
consecutive run of indices lets a bulk update read and write them as one slice instead
of one Python step per item.
"""

from __future__ import annotations

from durable_mp.core.bytemaps import fill_at


def run_start(indices: list[int]) -> int | None:
    """The first index if ``indices`` is ``[a, a+1, ..., a+n-1]`` with n >= 1 and a >= 0, else None."""
    if not indices:
        return None
    first = indices[0]
    n = len(indices)
    if first < 0 or indices[-1] - first != n - 1 or indices != list(range(first, first + n)):
        return None
    return first


def states_of(states: bytearray, indices: list[int], first: int | None) -> bytes:
    """The states at ``indices``; ``first`` is their ``run_start`` (a slice when they are one run)."""
    if first is not None:
        return bytes(states[first:first + len(indices)])
    return bytes(map(states.__getitem__, indices))


def set_states(states: bytearray, indices: list[int], state: int, first: int | None) -> None:
    """Set every index in ``indices`` to ``state``; ``first`` is their ``run_start`` (one slice for a run)."""
    if first is not None:
        states[first:first + len(indices)] = bytes((state,)) * len(indices)
        return
    fill_at(states, indices, state)
