"""Large checkpoint values live in blob files beside LMDB; LMDB holds a small reference.

Why: LMDB copies a large value into freshly allocated overflow pages, ``pwrite``s them
and syncs data and meta page separately, which on this kind of disk reaches about half of
what one ``write`` + ``fdatasync`` of the same bytes does.  So the committer appends every
value of at least ``BLOB_BYTES`` of one batch (per execution) to the execution's open blob
file, syncs it once, and only then commits the batch's LMDB transaction with references
in their place.  Each value's writeback is started as soon as it is written
(``sync_file_range``), so the disk works while the next value is copied and the final
``fdatasync`` waits only for the rest.

One file per execution and ``BlobWriter`` (one store session), appended to batch after
batch until it holds ``FILE_BYTES``: a new file costs a create and a directory fsync, an
appended batch only its ``fdatasync`` (which covers the file's new size).

Durability and crashes: a reference is committed only after its bytes, the file's size
and (for a new file) its directory entry are synced, so a committed reference never names
a missing or partial file.  A crash before the commit leaves unreferenced bytes: at the
end of a file other references keep (harmless: nothing points there), or a whole file
nothing refers to (an *orphan*).  A file whose write or sync failed is never written
again (after a failed fsync the kernel may report later ones as clean): the retry starts
a new file.  Bytes are never rewritten; a record that is replaced or deleted leaves its
old bytes behind until ``sweep`` (run when an execution's lock is taken, and by
``delete_execution``) removes every file of that execution no committed record refers to.

A large batch result never reaches the committer as bytes: the worker that produced it
appended it to a file of its own in the same directory and synced it
(``engine.result_blobs``), and the driver stages it as an ``InPlace`` value (a read-only
mapping of those bytes, ``store.worker_blobs.adopt``), which ``spill`` commits as the
worker's reference without writing anything.  A worker killed mid-write leaves a torn
tail nothing refers to; ``sweep`` cuts such tails off the worker files it keeps.

Layout: ``<store>/blobs/<blake2b(exec_id)>/<unique>.blob`` (``w<unique>.blob`` for a
worker's), directories 0700, files 0600, inside the store directory whose permissions the
store already checks.  The reference's format is ``core.blob_ref``.
"""

from __future__ import annotations

import mmap
import os
import pathlib
import shutil
import uuid
import zlib
from collections.abc import Iterable
from typing import Any

from durable_mp.core import blob_ref

# defined here before core.blob_ref: their old home keeps them
from durable_mp.core.blob_ref import BLOBS_DIR as BLOBS_DIR
from durable_mp.core.blob_ref import exec_dir_name as exec_dir_name
from durable_mp.core.blob_ref import is_ref as is_ref
from durable_mp.core.fileio import fsync_dir as _fsync_dir
from durable_mp.core.fileio import start_writeback as start_writeback
from durable_mp.core.fileio import write_all as _write_all
from durable_mp.exceptions import StoreError

BLOB_BYTES = 256 * 1024  # values this large and larger are written to a blob file
FILE_BYTES = 64 * 2**20  # a blob file this large gets no more values: a new one is started
DIR_MODE = 0o700
FILE_MODE = 0o600


class InPlace(mmap.mmap):
    """A value a worker already wrote and synced to a blob file: a read-only mapping of its bytes.

    Reads see it as the record's bytes; ``BlobWriter.spill`` commits ``ref`` in its place.
    """

    ref: bytes


def exec_dir(root: pathlib.Path, exec_id: str) -> pathlib.Path:
    return root / BLOBS_DIR / exec_dir_name(exec_id.encode())


def _mkdir(path: pathlib.Path) -> bool:
    """Create ``path`` (0700) if missing; whether it was created."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    os.chmod(path, DIR_MODE)  # umask may have removed bits; never added any
    return True


class _OpenFile:
    """A blob file being appended to: its descriptor, name relative to the store, and size."""

    __slots__ = ("fd", "rel", "size", "where")

    def __init__(self, fd: int, rel: str, where: pathlib.Path) -> None:
        self.fd = fd
        self.rel = rel
        self.size = 0
        self.where = where  # its directory (fsync'd once, after the file's first sync)


class BlobWriter:
    """Writes a store's large values, one open file per execution (see the module docstring).

    Used by one thread at a time (the store's committer); ``forget`` and ``close`` are
    called only while no commit is in flight.
    """

    def __init__(self, root: pathlib.Path, threshold: int = BLOB_BYTES, file_bytes: int | None = None) -> None:
        self.root = root
        self.threshold = threshold
        self.file_bytes = FILE_BYTES if file_bytes is None else file_bytes
        self._files: dict[bytes, _OpenFile] = {}  # exec key -> the file its next values are appended to

    def spill(self, items: list[tuple[bytes, Any]]) -> list[tuple[bytes, Any]]:
        """``items`` with every large value written durably to a blob file and replaced by its reference.

        Keys are full LMDB keys (``exec_id NUL parent NUL op``).  Returns ``items`` itself
        when nothing is large (the common case costs one ``len`` per item).
        """
        threshold = self.threshold
        big = [i for i, (_, value) in enumerate(items) if len(value) >= threshold]
        if not big:
            return items
        out = list(items)
        by_exec: dict[bytes, list[int]] = {}
        for i in big:
            key, value = items[i]
            if value.__class__ is InPlace:  # a worker synced it already: only its reference is committed
                out[i] = (key, value.ref)
                continue
            by_exec.setdefault(key[:key.index(b"\0")], []).append(i)
        for exec_key, indices in by_exec.items():
            try:
                self._append(exec_key, out, indices)
            except BaseException:
                self.forget(exec_key)  # never write to it again: a retry starts a new file
                raise
        return out

    def _append(self, exec_key: bytes, out: list[tuple[bytes, Any]], indices: list[int]) -> None:
        """Append the values ``out[i]`` (``i`` in ``indices``) of one execution and sync them; set their references."""
        f = self._files.get(exec_key)
        fresh = f is None
        if f is None:
            f = self._files[exec_key] = self._new_file(exec_key)
        fd, rel = f.fd, f.rel.encode()
        offset = f.size
        for i in indices:
            key, value = out[i]
            size = _write_all(fd, value)
            start_writeback(fd, offset, size)  # the disk starts on it while the next value is copied
            out[i] = (key, blob_ref.pack_v1(offset, size, rel))
            offset += size
        os.fdatasync(fd)  # the data and the file's new size, before any reference to them
        if fresh:
            _fsync_dir(f.where)  # the file's name, too
        f.size = offset
        if offset >= self.file_bytes:
            self.forget(exec_key)  # full: the next batch starts a new file

    def _new_file(self, exec_key: bytes) -> _OpenFile:
        top = self.root / BLOBS_DIR
        if _mkdir(top):
            _fsync_dir(self.root)
        folder = exec_dir_name(exec_key)
        where = top / folder
        if _mkdir(where):
            _fsync_dir(top)
        rel = f"{BLOBS_DIR}/{folder}/{uuid.uuid4().hex}.blob"
        fd = os.open(self.root / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        return _OpenFile(fd, rel, where)

    def forget(self, exec_key: bytes) -> None:
        """Close the execution's open file: its next values go to a new one (before a sweep or delete)."""
        f = self._files.pop(exec_key, None)
        if f is not None:
            os.close(f.fd)

    def close(self) -> None:
        for exec_key in list(self._files):
            self.forget(exec_key)


def load(root: pathlib.Path, ref: Any, where: str) -> bytes:
    """The value a reference stands for; ``StoreError`` if its file is missing, short or damaged."""
    try:
        parsed = blob_ref.parse(ref)
    except ValueError as exc:
        raise StoreError(f"checkpoint {where} in {root} has a {exc}") from None
    offset, size, crc, rel = parsed
    path = root / rel
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StoreError(f"checkpoint {where} in {root}: its blob {rel} cannot be read "
                         f"({exc.strerror}); was the store copied without its blobs directory?") from None
    try:
        data = os.pread(fd, size, offset) if size else b""
        while len(data) < size:  # pread may return less for a very large value
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                raise StoreError(f"checkpoint {where} in {root}: its blob {rel} is truncated")
            data += more
    finally:
        os.close(fd)
    if crc is not None and zlib.crc32(data) != crc:
        raise StoreError(f"checkpoint {where} in {root}: its blob {rel} is damaged (its {size:,} bytes at offset "
                         f"{offset:,} do not match the checksum recorded when they were written)")
    return data


def ref_name(ref: Any) -> str | None:
    """The file name (no directory) a reference points to, or None for an ordinary value."""
    if not is_ref(ref):
        return None
    try:
        return blob_ref.parse(ref).name
    except ValueError:
        return None


def sweep(root: pathlib.Path, exec_id: str, committed: Iterable[Any]) -> int:
    """Remove the execution's blob files that no value in ``committed`` refers to; how many.

    A worker's file that is kept loses its tail past the last byte referred to: what a
    worker killed mid-write (or a driver killed before committing) left there.  The
    caller holds the execution's lock and has no commit in flight, so no file being
    written for it can be mistaken for an orphan (its workers have ended with its last run).
    """
    where = exec_dir(root, exec_id)
    try:
        names = set(os.listdir(where))
    except FileNotFoundError:
        return 0
    ends: dict[str, int] = {}  # worker file -> end of the last value referred to in it
    for value in committed:
        if not is_ref(value):
            continue
        try:
            ref = blob_ref.parse(value)
        except ValueError:
            continue
        names.discard(ref.name)
        if blob_ref.is_worker_file(ref.name):
            ends[ref.name] = max(ends.get(ref.name, 0), ref.offset + ref.size)
    for name in names:
        try:
            os.unlink(where / name)
        except FileNotFoundError:
            pass
    for name, end in ends.items():
        _cut_tail(where / name, end)
    return len(names)


def _cut_tail(path: pathlib.Path, end: int) -> None:
    """Truncate ``path`` to ``end`` bytes if it is longer (never shorter: a reference points there)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # a missing file is the reader's error to report, with the record that needs it
    try:
        if os.fstat(fd).st_size > end:
            os.ftruncate(fd, end)
    finally:
        os.close(fd)


def remove_all(root: pathlib.Path, exec_id: str) -> None:
    """Delete the execution's blob directory (after its records are deleted)."""
    shutil.rmtree(exec_dir(root, exec_id), ignore_errors=True)


def has_blobs(root: pathlib.Path, exec_id: str) -> bool:
    try:
        return bool(os.listdir(exec_dir(root, exec_id)))
    except FileNotFoundError:
        return False


def exec_dirs(root: pathlib.Path) -> set[str]:
    """The names of every execution's blob directory."""
    try:
        return set(os.listdir(root / BLOBS_DIR))
    except FileNotFoundError:
        return set()


def remove_stale(root: pathlib.Path, listed: set[str], live_exec_ids: Iterable[str]) -> int:
    """Remove the blob directories in ``listed`` that belong to no execution in ``live_exec_ids``; how many.

    They are what a crash between deleting an execution's records and its blobs leaves.
    ``listed`` must be read *before* ``live_exec_ids``: an execution created in between
    has no blob directory in ``listed`` yet, so it is never mistaken for a stale one.
    """
    stale = listed - {exec_dir_name(e.encode()) for e in live_exec_ids}
    for name in stale:
        shutil.rmtree(root / BLOBS_DIR / name, ignore_errors=True)
    return len(stale)
