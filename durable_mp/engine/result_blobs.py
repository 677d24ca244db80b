"""A large batch result goes from its worker into the store's directory, never through the pipe.

::

    worker                                             driver
    run branch → record bytes ─ pwritev ─▶ w<id>.blob   (store/blobs/<exec dir>/)
                 writeback started, CRC-32              │
    next message: fdatasync, then                       │
                 Records(..., reference) ─── pipe ──────▶ check it, map the bytes (no copy):
                                                          the value from a private mapping,
                                                          the record staged as ``InPlace``
                                                          group commit: the reference into LMDB

Why: through the pipe a 16 MB result is copied into the pipe, out of it, and again into the
driver's blob file, all by the one driver thread.  Here each worker writes its own results
(the disk is the limit, not the driver), and the driver only maps the bytes the worker
wrote: the page cache still holds them.

Durability and crashes:

* A reference leaves the worker only after its bytes, the file's size and (for a new file)
  the names of the file and its directories are synced: a committed reference never names
  a missing or partial value.  Its CRC-32 is checked by every read from the store.
* One sync per message, not per result (group commit in the worker): a record is written
  (and its writeback started) when its branch returns; the ``fdatasync`` runs when the
  worker's next message leaves (``before_send``, called by the worker's channel), usually
  on the outbox's flusher thread while the next branch runs.  A file's names are synced
  when it is created, before anything is written to it.  If that sync fails, the worker
  exits at once (``SYNC_FAILED_EXIT``): the references it holds must never leave, and a
  file whose sync failed cannot be trusted again; the driver re-runs the branches whose
  records were lost, as for any dead worker, in a new worker with a new file.
* One file per worker process and execution, so no two writers share one: a worker killed
  mid-write leaves a torn tail in its own file, nothing refers to it, and the next worker
  process writes a file of its own.  ``store.blobs.sweep`` cuts such tails (and removes files
  nothing refers to) when the execution is next taken.
* A file whose write failed is never written again (what it already holds is synced), and
  that result travels through the pipe as before (the driver's committer then reports a
  disk that stays unwritable).
  A file someone swept or deleted meanwhile (no link left) is replaced by a new one.
* Each record starts on a page (the driver maps exactly its bytes) and its first
  out-of-band buffer on 64 bytes (numpy gets an aligned array).
* The value is written when the branch returns, before anything else runs in the worker:
  a result the user's code changes afterwards is stored as it was (a snapshot).

Only the local pool does this (``STORE_KEY`` in its settings): a Dask worker may run on
another host and cannot write the driver's store.  Only plain successes of at least
``WORKER_BLOB_BYTES`` under a pickle-compatible serdes: smaller results ride the outbox,
which batches many per message.  Directories are 0700 and files 0600; a blob directory
that another user owns, that others may write, or that is not a directory (a symlink) is
refused, and results then take the pipe.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import sys
import threading
from typing import Any, NamedTuple

from durable_mp import serdes as _serdes
from durable_mp.core import blob_ref
from durable_mp.core.fileio import fsync_dir, pwrite_all, start_writeback
from durable_mp.core.records import OpRecord, OpStatus

STORE_KEY = "blob_store"  # in a local pool's settings: the store's directory
WORKER_BLOB_BYTES = 1 << 20  # serialized results this large and larger are written by the worker
FILE_BYTES = 256 * 2**20  # a worker's file this large gets no more records: a new one is started
PAGE = mmap.ALLOCATIONGRANULARITY
ALIGN = 64  # the first out-of-band buffer's alignment in the file (a cache line; any dtype's)
DIR_MODE = 0o700
FILE_MODE = 0o600
SYNC_FAILED_EXIT = 75  # a worker's exit code when syncing its blob file failed (EX_TEMPFAIL)

log = logging.getLogger("durable_mp.worker")


class Written(NamedTuple):
    """A succeeded branch whose record a worker wrote to its blob file: only the reference travels.

    Shaped like the ``OpRecord`` the worker loop reports (``status``, ``extra``, ``dumps_parts``).
    """

    ref: bytes
    status: str = OpStatus.SUCCEEDED
    extra: None = None

    def dumps_parts(self) -> list[bytes]:
        return [self.ref]


class UnsafeDirectory(Exception):
    """A blob directory this worker must not write into."""


class Appender:
    """This worker process's blob file for one execution (see the module docstring).

    ``write`` runs on the worker's main thread; ``sync`` on whichever thread sends a
    message.  ``lock`` keeps a sync and the closing of a full file apart; writes never wait for it.
    """

    def __init__(self, root: str, exec_id: str, threshold: int = WORKER_BLOB_BYTES) -> None:
        self.root = root
        self.exec_id = exec_id
        self.threshold = threshold
        self.folder_name = blob_ref.exec_dir_name(exec_id.encode())
        self.fd = -1
        self.rel = ""
        self.pid = os.getpid()
        self.refused: str | None = None  # why results take the pipe instead (an unsafe directory)
        self.unsynced = False  # written since the last sync: the next message waits for one
        self.lock = threading.Lock()

    def takes(self, payload: Any) -> bool:
        """Whether ``payload`` (a serialized result) is written here rather than sent."""
        if payload is None or payload.__class__ is str:
            return False
        size = payload.nbytes if isinstance(payload, _serdes.Parts) else len(payload)
        return bool(size >= self.threshold) and self.refused is None

    def write(self, rec: OpRecord) -> Written | None:
        """Write ``rec``; its reference (durable once ``sync`` ran), or None if it must travel through the pipe."""
        try:
            return Written(self._append(_aligned_parts(rec)))
        except UnsafeDirectory as exc:
            self.refused = str(exc)
            log.warning("durable_mp: large results travel through the pipe: %s", exc)
        except OSError as exc:
            self._drop()  # never write to this file again: after a failed write its state is unknown
            log.warning("durable_mp: a large result travels through the pipe: writing it to %s failed: %s",
                        self.rel or self.folder_name, exc)
        return None

    def _append(self, parts: list[Any]) -> bytes:
        fd, size = self._file()
        start = -(-size // PAGE) * PAGE  # a page boundary: the driver maps exactly this record
        views = [memoryview(part).cast("B") for part in parts]
        n = pwrite_all(fd, views, start)
        start_writeback(fd, start, n)  # the disk works while the checksum is computed
        crc = blob_ref.crc32(views)
        self.unsynced = True  # after the write: a sync that clears it started after the write ended
        ref = blob_ref.pack_v2(start, n, crc, self.rel)
        if start + n >= FILE_BYTES:
            self._close_full()  # the next record starts a new file
        return ref

    def sync(self) -> None:
        """Make every record written so far durable (before a message with their references leaves).

        Under ``lock`` even when nothing is left to sync: a message taken while another
        thread's sync runs may hold references that sync covers, and must wait for its end.
        """
        with self.lock:
            if not self.unsynced:
                return
            self.unsynced = False
            if self.fd < 0 or self.pid != os.getpid():
                return  # closed when full: synced then
            try:
                os.fdatasync(self.fd)  # the bytes and the file's new size
            except OSError as exc:
                _sync_failed(self.rel, exc)

    def _file(self) -> tuple[int, int]:
        """(descriptor, size) of the file to append to; a new file's names are durable before it is written."""
        if self.fd >= 0 and self.pid == os.getpid():
            st = os.fstat(self.fd)
            if st.st_nlink:
                return self.fd, st.st_size
            self._close_full()  # swept or deleted since the last record: nobody would find what is appended
        self.pid = os.getpid()
        self.fd = -1
        top = os.path.join(self.root, blob_ref.BLOBS_DIR)
        _safe_dir(top)
        folder = os.path.join(top, self.folder_name)
        _safe_dir(folder)
        name = f"{blob_ref.WORKER_PREFIX}{os.urandom(16).hex()}.blob"
        fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE)
        try:  # the file's name and its directories' (another process may have made them, unsynced)
            fsync_dir(folder)
            fsync_dir(top)
            fsync_dir(self.root)
        except OSError:
            os.close(fd)
            raise
        self.fd, self.rel = fd, f"{blob_ref.BLOBS_DIR}/{self.folder_name}/{name}"
        return fd, 0

    def _close_full(self) -> None:
        """Sync and close the current file (full, or unlinked): what was written to it stays durable."""
        with self.lock:
            fd, self.fd = self.fd, -1
            if fd < 0 or self.pid != os.getpid():
                return
            try:
                os.fdatasync(fd)
            except OSError as exc:
                _sync_failed(self.rel, exc)
            finally:
                os.close(fd)

    def _drop(self) -> None:
        """Give up the current file after a failed write: nothing written to it since the last sync is referred to."""
        with self.lock:
            fd, self.fd = self.fd, -1
            if fd >= 0 and self.pid == os.getpid():
                if self.unsynced:  # records of earlier results whose references wait for a sync
                    try:
                        os.fdatasync(fd)
                    except OSError as exc:
                        _sync_failed(self.rel, exc)
                    self.unsynced = False
                os.close(fd)


def _sync_failed(rel: str, exc: OSError) -> None:
    """A blob file could not be synced: the references waiting for it must never leave this process."""
    print(f"durable_mp worker {os.getpid()}: syncing its blob file {rel} failed ({exc}); exiting so that no "
          f"reference to its unsynced results is sent (their branches run again)", file=sys.stderr, flush=True)
    os._exit(SYNC_FAILED_EXIT)


def _safe_dir(path: str) -> None:
    """Create ``path`` (0700) if missing; refuse one that is not our own private directory."""
    try:
        os.mkdir(path, DIR_MODE)
        os.chmod(path, DIR_MODE)  # umask may have removed bits; never added any
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeDirectory(f"{path} is owned by uid {st.st_uid}, not by this process's user")
    if stat.S_IMODE(st.st_mode) & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectory(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")


def _aligned_parts(rec: OpRecord) -> list[Any]:
    """``rec.dumps_parts()``, its first out-of-band buffer moved to an ``ALIGN`` boundary."""
    parts = rec.dumps_parts()
    result = rec.result
    if isinstance(result, _serdes.Parts) and len(parts) == 1 + len(result):
        before = len(parts[0]) + len(result[0]) + len(result[1])
        pad = -before % ALIGN
        if pad:
            parts = [parts[0], *_serdes.padded(result, pad)]
    return parts


# -- the worker process's sink -------------------------------------------------------------------
_SINK: list[Appender | None] = [None]


def configure(settings: dict[str, Any]) -> None:
    """In a worker process: write large results to the store named in ``settings``, if any."""
    root = settings.get(STORE_KEY)
    _SINK[0] = Appender(root, settings["execution_id"]) if root else None


def before_send() -> None:
    """Called by the worker's channel before each message: the references in it must be durable."""
    sink = _SINK[0]
    if sink is not None:
        sink.sync()


def sink_for(exec_id: str) -> Appender | None:
    """The appender for ``exec_id``'s large results in this process, or None (they take the pipe)."""
    sink = _SINK[0]
    return sink if sink is not None and sink.exec_id == exec_id else None


# -- the driver's side ---------------------------------------------------------------------------
UNDECODED: Any = object()


def take(root: Any, exec_id: str, ref: bytes) -> tuple[Any, Any]:
    """(the record to stage, the value or ``UNDECODED``) for a reference a worker sent.

    The value is decoded from a private copy-on-write mapping of the file: its arrays are
    the file's pages until someone writes to them, and a write never reaches the file.
    """
    from durable_mp.core.records import result_span
    from durable_mp.store.worker_blobs import adopt

    blob, private = adopt(root, exec_id, ref)
    if private is None:
        return blob, UNDECODED
    try:
        kind, start = result_span(private)
        if kind != b"B":
            return blob, UNDECODED
        return blob, _serdes.unpickle(private[start:], views=True)
    except Exception:  # noqa: BLE001 - the general path decodes it again and reports it with its context
        return blob, UNDECODED
