"""A digest of any hashable-by-value Python value, the same in every process, at memory speed.

``durable_mp.map`` names a computation and each of its items by such digests (DESIGN §2,
"Which computation a map is").  ``canonical`` encodes plain values by value; this module
adds what a pipeline passes around in bulk and hashes it without copying:

- ``bytes``, ``bytearray``, ``memoryview`` and numpy arrays of plain dtypes feed their
  buffer straight into SHA-256 (with the dtype and shape for arrays), which runs at about
  the speed of a memory copy where the CPU has SHA instructions: no pickle, no encoding;
- lists and tuples are hashed element by element (so a list of arrays is fast too);
- anything else that ``canonical`` refuses is hashed by its pickle, which is stable for
  the usual value types; what cannot even be pickled raises ``NotHashableError`` saying
  where it sits.
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Any

from durable_mp.core.canonical import NotCanonicalError, canonical_bytes

DIGEST_BYTES = 16
_PICKLE_PROTOCOL = 4  # fixed, so a digest does not change with the Python version's default


class NotHashableError(TypeError):
    """A value cannot be turned into a digest; ``where`` says which one (``"closure variable 'db'"``)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where} cannot be hashed: {reason}")
        self.where = where
        self.reason = reason


def _is_plain_array(value: Any) -> bool:
    cls = type(value)
    return cls.__module__ == "numpy" and cls.__name__ == "ndarray" and not value.dtype.hasobject


def _feed(h: Any, value: Any, where: str, depth: int) -> None:
    cls = type(value)
    if cls is bytes or cls is bytearray:
        h.update(b"B%d:" % len(value))
        h.update(value)
    elif cls is memoryview:
        data = value.cast("B") if value.c_contiguous else value.tobytes()
        h.update(b"M%d:" % data.nbytes)
        h.update(data)
    elif _is_plain_array(value):
        if not value.flags.c_contiguous:
            value = value.copy(order="C")
        h.update(f"A{value.dtype.str}{value.shape}:".encode())
        h.update(memoryview(value.reshape(-1).view("B")))
    elif (cls is list or cls is tuple) and depth < 64:
        h.update(b"L%d:" % len(value) if cls is list else b"T%d:" % len(value))
        for i, element in enumerate(value):
            _feed(h, element, f"{where}[{i}]", depth + 1)
    elif cls is dict and depth < 64 and not all(type(k) is str and type(v) in _SCALARS for k, v in value.items()):
        _feed_dict(h, b"D", value, where, depth)
    elif _is_plain_object(value) and depth < 64:  # its class and attributes: an array attribute is not pickled
        h.update(f"O{cls.__module__}:{cls.__qualname__}".encode())
        _feed_dict(h, b"", vars(value), where, depth)
    else:
        data = _encoded(value, where)
        h.update(b"V%d:" % len(data))
        h.update(data)


_SCALARS = (str, int, float, bool, type(None))


def _feed_dict(h: Any, tag: bytes, value: dict, where: str, depth: int) -> None:
    """Entries in the order of their keys' digests: the same whatever order they were inserted in."""
    entries = sorted((value_digest(k, f"a key of {where}"), k) for k in value)
    h.update(tag + b"%d:" % len(entries))
    for key_digest, key in entries:
        h.update(key_digest)
        _feed(h, value[key], f"{where}[{key!r}]", depth + 1)


def _is_plain_object(value: Any) -> bool:
    """An instance whose pickle would be its class and ``__dict__``: hashed from those directly."""
    cls: Any = type(value)
    base: Any = object
    return (cls.__module__ not in ("builtins", "numpy") and isinstance(getattr(value, "__dict__", None), dict)
            and not hasattr(cls, "__slots__") and cls.__reduce_ex__ is base.__reduce_ex__
            and cls.__reduce__ is base.__reduce__
            and getattr(cls, "__getstate__", None) is getattr(object, "__getstate__", None)
            and not isinstance(value, type))


def _encoded(value: Any, where: str) -> bytes:
    try:
        return canonical_bytes(value, where)
    except NotCanonicalError:
        pass
    try:
        return b"pickle\0" + pickle.dumps(value, protocol=_PICKLE_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - any pickling failure: say which value
        raise NotHashableError(where, f"{type(value).__name__} is neither a plain value nor picklable "
                                      f"({type(exc).__name__}: {exc})") from None


def _scalar_bytes(value: Any) -> bytes | None:
    """A plain scalar's bytes, tagged by type: the common item (an int, a path string) without ``canonical``."""
    cls = type(value)
    if cls is str:
        return b"s" + value.encode("utf-8", "surrogatepass")
    if cls is int:
        return b"i%x" % value
    if cls is float:
        return b"f" + repr(value).encode()
    return None


def value_digest(value: Any, where: str = "value") -> bytes:
    """``DIGEST_BYTES`` bytes that name ``value`` by its content (``NotHashableError`` if it cannot)."""
    scalar = _scalar_bytes(value)
    if scalar is not None:  # its own hash function: no collision with the tagged stream below
        return hashlib.blake2b(scalar, digest_size=DIGEST_BYTES, person=b"durable_mp.s").digest()
    h = hashlib.sha256()
    _feed(h, value, where, 0)
    return h.digest()[:DIGEST_BYTES]


def digest_of_parts(*parts: bytes) -> bytes:
    """One digest of several byte strings, each length-prefixed (no two sequences collide)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()[:DIGEST_BYTES]


__all__ = ["DIGEST_BYTES", "NotHashableError", "digest_of_parts", "value_digest"]
