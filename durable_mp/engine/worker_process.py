"""What makes a process a worker: it dies with its parent, ignores the driver's signal
handlers, and forwards its log records to the driver.

Process setup, apart from the work loop in ``worker``: the fork server (``start``) uses
``die_with_parent`` too, and the Dask backend re-emits records with ``record_data``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from typing import Any

from durable_mp.engine.protocol import Log
from durable_mp.engine.worker_state import IDLE

PARENT_CHECK_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1
NO_PDEATHSIG_ENV = "DURABLE_MP_NO_PDEATHSIG"  # set: rely on the parent watch alone, as without prctl (tests)


class ForwardHandler(logging.Handler):
    """Sends log records to the driver, which re-emits them through its own handlers."""

    def __init__(self, channel: Any, current: Any) -> None:
        super().__init__()
        self.channel = channel
        self.current = current  # the shared slot: index of the branch being run

    def emit(self, record: logging.LogRecord) -> None:
        try:
            index = self.current[0]
            self.channel.send(Log(record_data(record, None if index == IDLE else index)))
        except Exception:  # noqa: BLE001 - logging must never break a branch
            pass


def record_data(record: logging.LogRecord, index: int | None) -> dict[str, Any]:
    """A log record as plain fields (message formatted, traceback as text), for the driver to re-emit."""
    data = dict(record.__dict__)
    if index is not None and "branchIndex" not in data:  # which branch logged this
        data["branchIndex"] = index
    data["msg"] = record.getMessage()
    data["args"] = None
    if record.exc_info:
        data["exc_text"] = logging.Formatter().formatException(record.exc_info)
    data["exc_info"] = None
    return {k: v for k, v in data.items() if _plain(v)}


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _load_prctl() -> Any:
    """libc's ``prctl``, looked up at import: a forked worker inherits it instead of loading it as it starts."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no prctl (macOS)
        return None


_PRCTL = _load_prctl()


def die_with_parent(parent_pid: int, watch_thread: bool = True) -> None:
    """Exit when the parent (the driver, or the fork server) dies, even while user code holds the GIL in a C loop.

    ``prctl(PR_SET_PDEATHSIG)`` on Linux; where that is not available (macOS), a thread
    that polls ``getppid`` (a process whose parent died is re-parented), so a worker still
    never outlives its driver by more than ``PARENT_CHECK_SECONDS``.  The fork server
    passes ``watch_thread=False``: it must stay single-threaded and polls itself.
    """
    signalled = not os.environ.get(NO_PDEATHSIG_ENV) and _PRCTL is not None and \
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    if not watch_thread or signalled:  # the kernel kills us with the parent: a thread would only cost start time
        return

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_SECONDS)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="durable_mp-parent-watch").start()


def default_signals() -> None:
    """Forget the driver's signal handlers: any signal that ends a worker is a worker death.

    A forked worker inherits the driver's Python-level handlers (SIGTERM → SystemExit,
    SIGINT → KeyboardInterrupt), which would turn ``kill <worker>`` into an ordinary
    branch failure.  The worker also leaves the driver's process group, so a Ctrl-C at
    the terminal reaches only the driver, which then stops its workers itself.
    """
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                   signal.SIGALRM):
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    try:
        os.setpgid(0, 0)
    except OSError:
        pass


