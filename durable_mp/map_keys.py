"""Which computation a ``durable_mp.map`` call is, and so its execution id.

The function is named by ``identity.callable_identity`` (with ``name``), each item by
``key(item)`` (default: the item itself) hashed by ``core.digest``; the execution id is a
readable label and a hash of both, so the same call resumes its execution and calls that
differ in any of these never share one.  ``file_key``/``file_content_key`` are ``key=``
functions for items that are file paths.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

from durable_mp.core.digest import NotHashableError, digest_of_parts, value_digest
from durable_mp.exceptions import ValidationError
from durable_mp.identity import callable_identity

__all__ = ["execution_id_for", "file_content_key", "file_key"]

ID_PREFIX = "map"
DIGEST_BYTES = 8  # 16 hex characters, as default handler ids
NAME_CHARS = 40  # of the readable part of a derived id
PARALLEL_HASH_BYTES = 1 << 20  # items from this size on are hashed on several threads
HASH_THREADS = 4


def _computation(func: Callable[..., Any], name: str | None) -> bytes:
    """The digest of which computation ``func`` is (``identity.callable_identity``) and ``name``."""
    try:
        ident = callable_identity(func)
    except NotHashableError as exc:
        if name is None:
            raise ValidationError(
                f"durable_mp.map cannot tell this function apart from others: {exc}. Pass name='...' to name the "
                f"computation yourself (its state is then not hashed: a different state needs another name)."
            ) from None
        ident = callable_identity(func, state=False)
    return digest_of_parts(b"map-1", ident, (name or "").encode())


def _item_keys(values: list[Any], key: Callable[[Any], Any] | None) -> bytes:
    """Every item's key digest, ``DIGEST_BYTES`` each, in input order.

    Large items (numpy arrays, bytes) are hashed on a few threads: hashlib releases the GIL
    while it hashes a large buffer, and the workers are not running yet.  The digests are
    the same either way.
    """
    def digest(index: int) -> bytes:
        item = values[index]
        return value_digest(key(item) if key is not None else item, f"item {index}")

    threads = min(HASH_THREADS, os.cpu_count() or 1, len(values))
    try:
        if key is None and threads > 1 and _nbytes(values[0]) >= PARALLEL_HASH_BYTES:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads, thread_name_prefix="durable_mp-hash") as pool:
                return b"".join(pool.map(digest, range(len(values))))  # the first failure in input order
        return b"".join([digest(index) for index in range(len(values))])
    except NotHashableError as exc:
        hint = ("the key= function must return a plain value (text, numbers, tuples, bytes)" if key is not None
                else "pass key=... to name each item by something hashable (an item that cannot be pickled "
                     "cannot reach a worker process either)")
        raise ValidationError(f"durable_mp.map: {exc}; {hint}") from None


def _nbytes(value: Any) -> int:
    """The size of a buffer-like item (a numpy array, bytes), 0 for anything else."""
    if type(value) in (bytes, bytearray):
        return len(value)
    nbytes = getattr(value, "nbytes", 0)
    return nbytes if type(nbytes) is int else 0


def _label_of(func: Callable[..., Any], name: str | None) -> str:
    label = name or getattr(func, "__name__", None) or getattr(getattr(func, "func", None), "__name__", None)
    label = label or type(func).__name__
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label).strip("-")[:NAME_CHARS] or "func"


def execution_id_for(func: Callable[..., Any], items: list[Any], name: str | None = None,
                     key: Callable[[Any], Any] | None = None) -> str:
    """The id ``map`` uses without ``execution_id=``: readable part + hash of the computation and the item keys."""
    digest = digest_of_parts(_computation(func, name), _item_keys(list(items), key))
    return f"{ID_PREFIX}-{_label_of(func, name)}-{digest[:DIGEST_BYTES].hex()}"


def file_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """``key=`` for items that are file paths: path, size and modification time (a changed file runs again)."""
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def file_content_key(path: str | os.PathLike[str]) -> tuple[str, bytes]:
    """``key=`` for file paths by content: the path and a hash of the bytes (a touched, unchanged file is reused)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return (os.path.abspath(path), h.digest())
