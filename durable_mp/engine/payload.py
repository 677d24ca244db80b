"""What a batch ships to its workers: the branch functions (or map function and inputs).

Built once per batch in the driver and sent once to each worker (the reference's map
hands every item the whole input sequence, so the inputs must not travel per item).
The map inputs are pickled with their large buffers (numpy arrays) out of band, laid
end to end after the pickle stream: building the payload copies an array once, and a
worker's inputs are views of the payload it received (a copy-on-write mapping of a
memory file for a large one, ``wire.Shared``), not copies unpickled out of it.
Everything is cloudpickled up front, so an unpicklable branch or map item is found in
the driver and fails only itself, with a message naming it.  In the worker, parallel
branches are unpickled one by one on first use, so one that cannot be loaded there fails
alone too.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from durable_mp.core.text import safe_str
from durable_mp.core.vocabulary import PICKLE_PROTOCOL
from durable_mp.engine import pickling, wire
from durable_mp.engine.branch import BranchSource
from durable_mp.exceptions import SerDesError

if TYPE_CHECKING:  # annotations only (a worker's start: engine.state)
    from durable_mp.core.spec import BatchSpec

SHARED_PAYLOAD_BYTES = 4 * 2**20  # above this, branches sharing objects are pickled together
_MAGIC = b"DMPP"  # a payload: _MAGIC, section count, section lengths, then the sections (each aligned)
_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")
_ALIGN = 64  # an out-of-band array starts on a cache line (and on its dtype's alignment)


def _unpicklable(what: str, obj: Any, exc: Exception) -> SerDesError:
    return SerDesError(f"{what} cannot be pickled for the worker processes "
                       f"(object of type {type(obj).__name__}): {type(exc).__name__}: {safe_str(exc)}")


def build_payload(spec: BatchSpec, fail: Callable[[int, Exception], None]) -> bytes:
    """The batch's payload; ``fail(index, error)`` is called for each branch that cannot be pickled."""
    meta: dict[str, Any] = {
        "op_id": spec.op_id,
        "item_sub_type": spec.item_sub_type,
        "item_serdes": pickling.dumps(spec.item_serdes),
        "funcs": None,
        "func": None,
        "inputs": None,
        "names": None,
        "flat": spec.flat,
    }
    if spec.funcs is not None:
        blobs: list[bytes | None] = []
        for index, func in enumerate(spec.funcs):
            try:
                blobs.append(pickling.dumps(func))
            except Exception as exc:  # noqa: BLE001
                blobs.append(None)
                fail(index, _unpicklable(f"branch {index} ({spec.item_name(index)})", func, exc))
        meta["funcs"] = _share_closures(spec.funcs, blobs)
        meta["names"] = [spec.item_name(i) for i in range(spec.n)]
    else:
        try:
            meta["func"] = pickling.dumps(spec.func)
        except Exception as exc:  # noqa: BLE001
            raise SerDesError(f"map function {getattr(spec.func, '__name__', spec.func)!r} cannot be pickled "
                              f"for the worker processes: {type(exc).__name__}: {safe_str(exc)}") from exc
        stream, buffers = _pickle_inputs(spec, fail)
        return _lay_out([pickle.dumps(meta, protocol=PICKLE_PROTOCOL), stream, *buffers])
    return _lay_out([pickle.dumps(meta, protocol=PICKLE_PROTOCOL)])


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _lay_out(sections: list[Any]) -> bytes:
    """``sections`` end to end in one buffer, after a table of their lengths (one copy of each).

    A large payload is laid out in a memory file (``wire.MemoryFile``), which the pool hands
    to the workers as it is; a small one in a ``bytearray``.  Both are bytes-like.
    """
    views = [memoryview(section).cast("B") for section in sections]
    head = bytearray(_padded(len(_MAGIC) + _COUNT.size + _LENGTH.size * len(views)))
    head[:len(_MAGIC)] = _MAGIC
    _COUNT.pack_into(head, len(_MAGIC), len(views))
    writes: list[tuple[int, Any]] = [(0, head)]
    offset = len(head)
    for k, view in enumerate(views):
        _LENGTH.pack_into(head, len(_MAGIC) + _COUNT.size + _LENGTH.size * k, view.nbytes)
        writes.append((offset, view))
        offset += _padded(view.nbytes)
    if offset >= wire.SHARE_BYTES and wire.can_share():
        return wire.memory_file(offset, writes)  # type: ignore[return-value]  # bytes-like
    out = bytearray(offset)
    for at, data in writes:
        out[at:at + data.nbytes if isinstance(data, memoryview) else at + len(data)] = data
    return out  # type: ignore[return-value]  # a bytearray: bytes-like, and not copied once more


def _sections(payload: Any) -> list[memoryview]:
    """The sections ``_lay_out`` wrote, as views of ``payload`` (no copy)."""
    view = memoryview(payload).cast("B")
    if bytes(view[:len(_MAGIC)]) != _MAGIC:
        raise ValueError("not a durable_mp batch payload")
    (count,) = _COUNT.unpack_from(view, len(_MAGIC))
    offset = _padded(len(_MAGIC) + _COUNT.size + _LENGTH.size * count)
    out = []
    for k in range(count):
        (n,) = _LENGTH.unpack_from(view, len(_MAGIC) + _COUNT.size + _LENGTH.size * k)
        out.append(view[offset:offset + n])
        offset += _padded(n)
    return out


def _share_closures(funcs: list[Any], blobs: list[bytes | None]) -> list[bytes | None] | bytes:
    """Per-branch blobs, or one blob for all branches when they share large objects.

    Branches pickled one by one fail one by one, but a 100 MB array that every branch
    closes over would be copied into every blob (and every worker gets all of them).
    When the blobs are large and pickling them together halves the size, one shared blob
    is sent instead; then a branch that cannot be unpickled in the worker fails them all.
    """
    total = sum(len(blob) for blob in blobs if blob is not None)
    if total < SHARED_PAYLOAD_BYTES or any(blob is None for blob in blobs):
        return blobs
    try:
        together = pickling.dumps(list(funcs))
    except Exception:  # noqa: BLE001 - keep the per-branch blobs
        return blobs
    return together if 2 * len(together) < total else blobs


def _pickle_inputs(spec: BatchSpec, fail: Callable[[int, Exception], None]) -> tuple[bytes, list[Any]]:
    """The inputs' pickle stream and their out-of-band buffers (views of the arrays, not copies)."""
    inputs = spec.inputs
    assert inputs is not None
    try:
        return pickling.dumps_out_of_band(inputs)
    except Exception:  # noqa: BLE001 - find the culprits, fail only them
        cleaned = list(inputs)
        for index, item in enumerate(inputs):
            try:
                pickling.dumps(item)
            except Exception as exc:  # noqa: BLE001
                cleaned[index] = None
                fail(index, _unpicklable(f"map item {index} ({spec.item_name(index)})", item, exc))
        return pickling.dumps_out_of_band(cleaned)


class _LazyBranches:
    """Parallel branch functions, unpickled on first use so one bad branch fails alone."""

    def __init__(self, blobs: list[bytes | None] | bytes, names: list[str]) -> None:
        self.blobs = blobs  # one blob per branch, or one shared blob (see _share_closures)
        self.names = names
        self.loaded: dict[int, Any] = {}

    def __getitem__(self, index: int) -> Any:
        func = self.loaded.get(index)
        if func is None:
            try:
                if not isinstance(self.blobs, list):
                    self.loaded.update(enumerate(pickling.loads(self.blobs)))
                    return self.loaded[index]
                func = self.loaded[index] = pickling.loads(self.blobs[index])
            except Exception as exc:  # noqa: BLE001
                raise SerDesError(
                    f"branch {index} ({self.names[index]}) could not be unpickled in the worker: "
                    f"{type(exc).__name__}: {safe_str(exc)}"
                ) from exc
        return func


class _Unloadable:
    """Stands in for a map function or inputs the worker could not unpickle."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __call__(self, *args: Any) -> Any:
        raise self.error

    def __getitem__(self, index: int) -> Any:
        raise self.error


def load_source(payload: bytes, execution_id: str) -> BranchSource:
    """The worker's view of a payload built by ``build_payload``."""
    sections = _sections(payload)
    meta = pickle.loads(sections[0])
    funcs = func = inputs = None
    if meta["funcs"] is not None:
        funcs = _LazyBranches(meta["funcs"], meta["names"])
    else:
        try:
            func = pickling.loads(meta["func"])
            buffers = sections[2:]
            if buffers and buffers[0].readonly:  # bytes (a Dask task's argument): inputs stay writable, as pickled
                buffers = [bytearray(b) for b in buffers]  # type: ignore[misc]
            inputs = pickling.loads(sections[1], buffers=buffers)
        except Exception as exc:  # noqa: BLE001
            err = SerDesError(f"map function or inputs could not be unpickled in the worker: "
                              f"{type(exc).__name__}: {safe_str(exc)}")
            func = _Unloadable(err)
            inputs = _Unloadable(err)
    lazy: Any = funcs  # _LazyBranches: indexable like the sequence BranchSource expects
    return BranchSource(funcs=lazy, func=func, inputs=inputs, item_serdes=pickle.loads(meta["item_serdes"]),
                        batch_op_id=meta["op_id"], item_sub_type=meta["item_sub_type"],
                        names=meta["names"], execution_id=execution_id, flat=meta.get("flat", False))
