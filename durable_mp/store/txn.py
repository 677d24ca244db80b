"""LMDB transactions of one ``Store``: reads, writes that grow the map until they fit.

Each transaction holds the environment's process-wide lock (``env.SharedEnv``); a read or
write that finds the map resized by another process adopts its size, a write that finds
it full doubles it (up to ``MAX_MAP_SIZE``, past which a full map is a full disk).  Any
other LMDB error becomes a ``StoreError`` naming the store.  The ``Store`` has one
``Transactions`` and keeps the retrying and latching of failed writes (``_write_or_latch``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any, TypeVar

import lmdb

from durable_mp.exceptions import StoreError
from durable_mp.store.env import SharedEnv

MAX_MAP_SIZE = 1 << 42  # bytes (4 TiB): past this a full map is a full disk, not a small map

T = TypeVar("T")
Txn = Any  # an lmdb.Transaction (py-lmdb ships no type information)


class Transactions:
    """Read and write transactions on one store's environment (``shared``, None once closed)."""

    def __init__(self, path: pathlib.Path, readonly: bool, stats: dict[str, int], shared: SharedEnv) -> None:
        self.path = path
        self.readonly = readonly
        self.stats = stats  # the Store's counters: "commits" and "map_grows" are counted here
        self.shared: SharedEnv | None = shared

    def env(self) -> SharedEnv:
        shared = self.shared
        if shared is None:
            raise StoreError(f"the durable_mp store {self.path} is closed")
        shared.usable_by_this_process()
        return shared

    def writable(self) -> SharedEnv:
        if self.readonly:
            raise StoreError(f"the durable_mp store {self.path} was opened read-only")
        return self.env()

    def read(self, fn: Callable[[Txn, SharedEnv], T]) -> T:
        shared = self.env()
        with shared.lock:
            while True:
                try:
                    with shared.env.begin() as txn:
                        return fn(txn, shared)
                except lmdb.MapResizedError:
                    shared.env.set_mapsize(0)  # another process grew the map: adopt its size
                except lmdb.Error as exc:
                    raise StoreError(f"reading the durable_mp store {self.path} failed: {exc}") from exc

    def write(self, fn: Callable[[Txn, SharedEnv], T]) -> T:
        """Run ``fn(txn, shared)`` in one write transaction, growing the map until it fits."""
        shared = self.writable()
        with shared.lock:
            while True:
                try:
                    with shared.env.begin(write=True) as txn:
                        out = fn(txn, shared)
                    self.stats["commits"] += 1
                    return out
                except lmdb.MapFullError:
                    self.grow(shared)
                except lmdb.MapResizedError:
                    shared.env.set_mapsize(0)
                except lmdb.Error as exc:
                    raise StoreError(f"writing the durable_mp store {self.path} failed: {exc}") from exc

    def grow(self, shared: SharedEnv) -> None:
        size: int = shared.env.info()["map_size"]
        if size >= MAX_MAP_SIZE:
            raise StoreError(f"the durable_mp store {self.path} is full ({size} bytes mapped)")
        shared.env.set_mapsize(min(size * 2, MAX_MAP_SIZE))
        self.stats["map_grows"] += 1
