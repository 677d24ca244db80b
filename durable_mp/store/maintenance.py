"""Removing executions from a store and giving the space back (``delete``, ``gc``).

Deleting an execution frees its LMDB pages for later writes; the data file itself keeps
its size.  ``compact`` shrinks it: a compacting copy of the environment replaces
``data.mdb``.  That is only safe while no other process has the store open, which is
checked the way LMDB itself checks it: whoever can take the exclusive ``fcntl`` lock on
``lock.mdb`` is the only process using the environment.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from dataclasses import dataclass

import lmdb

from durable_mp.exceptions import ExecutionLockedError, StoreError
from durable_mp.store import blobs
from durable_mp.store.facade import Store
from durable_mp.store.env import DATA_FILE, FILE_MODE, LOCK_FILE, MAX_DBS
from durable_mp.store.records import FAILED, RUNNING, SUCCEEDED, ExecutionRecord, owner_alive

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
COMPACT_DIR = "compact.tmp"


def parse_duration(text: str) -> float:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"``, ``"2w"`` -> seconds; ``ValueError`` otherwise."""
    m = _DURATION.match(text or "")
    if not m:
        raise ValueError(f"bad duration {text!r}: use a number and a unit s, m, h, d or w (e.g. 7d, 12h, 30m)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def finished(rec: ExecutionRecord) -> bool:
    return rec.status in (SUCCEEDED, FAILED)


def check_deletable(rec: ExecutionRecord, *, force: bool) -> None:
    """Raise unless ``rec`` may be deleted (finished, or abandoned and ``force``).

    Never while a live driver holds its lock, whatever the status: a FAILED execution
    with a live owner is being resumed (its status turns RUNNING only once its failed
    checkpoints are reopened).  Pass it as ``Store.delete_execution``'s ``check``, so it
    is made in the deleting transaction.
    """
    if rec.owner_pid and owner_alive(rec):
        what = "running" if rec.status == RUNNING else f"{rec.status} and held by a live driver (resuming it)"
        raise ExecutionLockedError(f"execution {rec.exec_id!r} is {what} (driver pid {rec.owner_pid}); "
                                   f"stop it before deleting it")
    if not finished(rec) and not force:
        raise StoreError(f"execution {rec.exec_id!r} is unfinished ({rec.status}) and could still be resumed; "
                         f"pass --force to delete it anyway")


@dataclass
class GcResult:
    deleted: list[str]
    kept_unfinished: int


def collect(store: Store, older_than_s: float, *, dry_run: bool = False, now: float | None = None) -> GcResult:
    """Delete finished executions that ended more than ``older_than_s`` seconds ago."""
    cutoff = (time.time() if now is None else now) - older_than_s
    deleted, kept = [], 0
    listed = blobs.exec_dirs(store.path)  # before the executions: see blobs.remove_stale
    executions = store.list_executions()
    if not dry_run and listed:
        blobs.remove_stale(store.path, listed, (rec.exec_id for rec in executions))

    def collectable(rec: ExecutionRecord) -> bool:
        try:
            check_deletable(rec, force=False)
        except (StoreError, ExecutionLockedError):
            return False
        return True

    def check(rec: ExecutionRecord) -> None:  # again in the deleting transaction: a driver may have taken it since
        if not (collectable(rec) and (rec.ended_ts or rec.created_ts) <= cutoff):
            raise _Kept(rec.exec_id)

    for rec in executions:
        if not collectable(rec):
            kept += 1
            continue
        if (rec.ended_ts or rec.created_ts) > cutoff:
            continue
        if not dry_run:
            try:
                store.delete_execution(rec.exec_id, check)
            except _Kept:
                kept += 1
                continue
        deleted.append(rec.exec_id)
    return GcResult(deleted, kept)


class _Kept(Exception):
    """An execution gc listed as collectable was taken by a driver before its delete."""


def data_size(path: os.PathLike[str] | str) -> int:
    try:
        return os.stat(os.path.join(os.fspath(path), DATA_FILE)).st_size
    except OSError:
        return 0


def _exclusive(lock_path: str) -> int:
    """Open ``lock.mdb`` and take LMDB's exclusive lock; StoreError if another process has the store open."""
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
    except OSError:
        os.close(fd)
        raise StoreError(f"cannot compact {os.path.dirname(lock_path)}: another process has the store open "
                         f"(a running driver or a reader); try again when it is idle") from None
    return fd


def compact(path: os.PathLike[str] | str) -> tuple[int, int]:
    """Rewrite the store's data file without free pages; return (bytes before, bytes after).

    The ``Store`` objects of this process on ``path`` must all be closed.
    """
    path = os.fspath(path)
    before = data_size(path)
    lock_path = os.path.join(path, LOCK_FILE)
    tmp = os.path.join(path, COMPACT_DIR)
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    try:
        fd = _exclusive(lock_path)
        os.close(fd)  # LMDB takes its own locks; closing ours releases it (fcntl locks are per process)
        try:
            env = lmdb.open(path, readonly=True, max_dbs=MAX_DBS, lock=True, create=False)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open durable_mp store {path} for compaction: {exc}") from None
        try:
            env.copy(tmp, compact=True)
        finally:
            env.close()
        fd = _exclusive(lock_path)  # nobody opened the store meanwhile: safe to swap the file
        try:
            new = os.path.join(tmp, DATA_FILE)
            os.chmod(new, FILE_MODE)
            os.replace(new, os.path.join(path, DATA_FILE))
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return before, data_size(path)
