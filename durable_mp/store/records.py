"""Execution records, id rules and lock ownership for the store (no LMDB in here).

An execution's lock is its owner: a (host, pid, process start time) triple, so a recycled
pid is never mistaken for a live owner.  Whether an owner on this host lives is read from
its process; an owner on another host (a store on a shared disk, a driver moved to
another machine) cannot be looked at, so it holds a lease it renews while it runs
(``LEASE_SECONDS``), and its lock is taken over only once that lease has expired.
``claim`` is the whole lock policy between processes, as a pure function of the stored
record and the claiming process.  Within one process the stored owner cannot tell threads
apart, so ``HOLDERS`` records which thread holds which execution: a second thread (or a
nested run in the same thread) is refused, and the lock of a thread that ended without
releasing it is taken over, as a dead process's is.
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import threading
import time
from typing import Any, NamedTuple

import psutil

from durable_mp.exceptions import ExecutionLockedError
from durable_mp.core.vocabulary import FAILED as FAILED
from durable_mp.core.vocabulary import PICKLE_PROTOCOL
from durable_mp.core.vocabulary import RUNNING as RUNNING
from durable_mp.core.vocabulary import SUCCEEDED as SUCCEEDED

MAX_EXEC_ID_CHARS = 200  # also at most this many UTF-8 bytes
MAX_ID_BYTES = 150  # parent_id / op_id, UTF-8; with the exec id a key stays under LMDB's 511
CREATE_TIME_TOLERANCE_S = 0.01  # process start times are in clock ticks (1/100 s)
LEASE_SECONDS = 60.0  # an owner renews its lease every third of this; another host waits it out
HOST = socket.gethostname()

SEP = "\0"  # between exec_id, parent_id and op_id in a key; no id may contain it
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class ExecutionRecord(NamedTuple):
    """One durable execution.  ``owner_pid`` is 0 when no driver holds it."""

    exec_id: str
    status: str  # RUNNING | SUCCEEDED | FAILED
    handler: str  # "module:qualname"
    input: bytes | None  # pickled event
    result: bytes | None
    error: dict[str, Any] | None
    created_ts: float
    started_ts: float  # start of the latest run
    ended_ts: float | None
    owner_pid: int
    owner_create_time: float
    runs: int
    extra: dict[str, Any] | None = None
    owner_host: str = ""  # "" in records written before hosts were recorded: this host
    lease_until: float = 0.0  # the owner's lease (time.time()), renewed while it runs

    def dumps(self) -> bytes:
        return pickle.dumps(tuple(self), protocol=PICKLE_PROTOCOL)

    @classmethod
    def loads(cls, data: bytes) -> "ExecutionRecord":
        return cls(*pickle.loads(data))


def validate_exec_id(exec_id: str) -> str:
    """Return ``exec_id`` or raise ``ValueError`` saying what is wrong with it."""
    if not isinstance(exec_id, str):
        raise ValueError(f"execution id must be a str, not {type(exec_id).__name__}")
    if not exec_id:
        raise ValueError("execution id must not be empty")
    if len(exec_id) > MAX_EXEC_ID_CHARS or len(exec_id.encode()) > MAX_EXEC_ID_CHARS:
        raise ValueError(f"execution id is too long ({len(exec_id)} characters): at most "
                         f"{MAX_EXEC_ID_CHARS} characters ({MAX_EXEC_ID_CHARS} bytes in UTF-8)")
    bad = _CONTROL.search(exec_id)
    if bad:
        raise ValueError(f"execution id {exec_id!r} contains control character {bad.group()!r} "
                         f"at position {bad.start()}; NUL and control characters are not allowed")
    return exec_id


def check_id(kind: str, value: str) -> None:
    """Raise ``ValueError`` unless ``value`` can be a parent_id / op_id."""
    if not isinstance(value, str):
        raise ValueError(f"{kind} must be a str, not {type(value).__name__}")
    if SEP in value:
        raise ValueError(f"{kind} {value!r} contains NUL")
    if len(value.encode()) > MAX_ID_BYTES:
        raise ValueError(f"{kind} is too long ({len(value.encode())} bytes, at most {MAX_ID_BYTES})")


_ME: dict[int, tuple[int, float]] = {}


def this_process() -> tuple[int, float]:
    """(pid, start time) of the calling process."""
    pid = os.getpid()
    me = _ME.get(pid)
    if me is None:
        me = _ME[pid] = (pid, psutil.Process(pid).create_time())
    return me


def _is(rec: ExecutionRecord, proc: tuple[int, float]) -> bool:
    return (rec.owner_pid == proc[0] and abs(rec.owner_create_time - proc[1]) <= CREATE_TIME_TOLERANCE_S
            and rec.owner_host in ("", HOST))


def on_other_host(rec: ExecutionRecord) -> bool:
    return bool(rec.owner_host) and rec.owner_host != HOST


def owner_alive(rec: ExecutionRecord, now: float | None = None) -> bool:
    """Is the process that took the lock still running (same pid *and* same start time)?

    On another host: is its lease still running (its process cannot be looked at from here)?
    """
    if not rec.owner_pid:
        return False
    if on_other_host(rec):
        return rec.lease_until > (time.time() if now is None else now)
    try:
        proc = psutil.Process(rec.owner_pid)
        if abs(proc.create_time() - rec.owner_create_time) > CREATE_TIME_TOLERANCE_S:
            return False  # the pid was recycled
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists and we cannot look closer: assume the owner is alive


INTERRUPTED = "INTERRUPTED"  # shown for a RUNNING execution whose driver is gone


def display_status(rec: ExecutionRecord) -> str:
    """The status every view shows: INTERRUPTED for a RUNNING execution without a live driver."""
    if rec.status == RUNNING and not owner_alive(rec):
        return INTERRUPTED
    return rec.status


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def claim(rec: ExecutionRecord, me: tuple[int, float], now: float) -> ExecutionRecord:
    """The record after ``me`` takes the lock of an existing execution.

    Raises ``ExecutionLockedError`` while another live process owns it RUNNING (or FAILED:
    it is resuming it, docs/architecture.md "Running a handler").  Taking
    over a RUNNING execution (dead owner, released after Ctrl-C) starts a new run.
    """
    # a FAILED execution with a live owner is being resumed by it (fix and resume), or read
    if rec.status in (RUNNING, FAILED) and not _is(rec, me) and owner_alive(rec, now):
        if on_other_host(rec):
            raise ExecutionLockedError(
                f"execution {rec.exec_id!r} is held by a driver on host {rec.owner_host!r} (pid {rec.owner_pid}), "
                f"whose lease runs until {_when(rec.lease_until)}; running since {_when(rec.started_ts)}. "
                f"A lock held on another host is taken over only after its lease expires "
                f"({LEASE_SECONDS:g}s after that driver stopped renewing it).")
        raise ExecutionLockedError(
            f"execution {rec.exec_id!r} is being run by another live driver: pid {rec.owner_pid} "
            f"(process started {_when(rec.owner_create_time)}), running since {_when(rec.started_ts)}. "
            f"Wait for it to finish or stop that process; the lock of a dead driver is taken over "
            f"automatically.")
    if rec.status == RUNNING:
        # run_starts: every run's start, so inspection can tell the runs (and the gaps) apart
        extra = {**(rec.extra or {}), "run_starts": [*(rec.extra or {}).get("run_starts", ()), now]}
        rec = rec._replace(runs=rec.runs + 1, started_ts=now, extra=extra)
    return rec._replace(owner_pid=me[0], owner_create_time=me[1], owner_host=HOST, lease_until=now + LEASE_SECONDS)


def owned_new(rec: ExecutionRecord, me: tuple[int, float], now: float) -> ExecutionRecord:
    """A new execution's record, owned by ``me`` with a fresh lease."""
    return rec._replace(owner_pid=me[0], owner_create_time=me[1], owner_host=HOST, lease_until=now + LEASE_SECONDS)


def lease_period() -> float:
    """How often an owner renews its lease."""
    return LEASE_SECONDS / 3


def renewed(rec: ExecutionRecord, me: tuple[int, float], now: float) -> ExecutionRecord | None:
    """The record with ``me``'s lease extended, or None when ``me`` no longer owns it."""
    if not rec.owner_pid or not _is(rec, me):
        return None
    return rec._replace(owner_host=HOST, lease_until=now + LEASE_SECONDS)


def unclaim(rec: ExecutionRecord, me: tuple[int, float]) -> ExecutionRecord | None:
    """The record with its owner cleared, or None to leave it (no owner, or a live other one)."""
    if not rec.owner_pid or (not _is(rec, me) and owner_alive(rec)):
        return None
    return rec._replace(owner_pid=0, owner_create_time=0.0, owner_host="", lease_until=0.0)


HoldKey = tuple[object, str]  # (the store environment's identity, execution id)


class ThreadHolders:
    """Which thread of this process holds which execution's lock (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[HoldKey, threading.Thread] = {}
        os.register_at_fork(after_in_child=self._forget_all)

    def _forget_all(self) -> None:
        """In a forked child: it holds nothing of its parent's (and the lock may have been taken)."""
        self._lock = threading.Lock()
        self._held = {}

    def hold(self, key: HoldKey) -> None:
        """Record the calling thread as the holder; ``ExecutionLockedError`` if a live thread is."""
        me = threading.current_thread()
        with self._lock:
            holder = self._held.get(key)
            if holder is not None and holder.is_alive():
                who = "this thread already runs it (a nested run of the same execution?)" if holder is me else (
                    f"another thread of this process runs it ({holder.name!r})")
                raise ExecutionLockedError(
                    f"execution {key[1]!r} is locked: {who}. One execution runs in one thread at a "
                    f"time; wait for that run to finish.")
            self._held[key] = me

    def drop(self, key: HoldKey) -> bool:
        """Forget the calling thread's hold; False (and nothing changes) if another live thread holds it."""
        with self._lock:
            holder = self._held.get(key)
            if holder is not None and holder is not threading.current_thread() and holder.is_alive():
                return False
            self._held.pop(key, None)
            return True


HOLDERS = ThreadHolders()
