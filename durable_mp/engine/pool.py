"""Worker processes: start, watch, kill and replace them.

::

    driver                                    worker (forked)
    ┌──────────────────────────┐   "T" task   ┌─────────────────────────┐
    │ Dispatcher ──wire.send───┼─────────────▶│ worker_main             │
    │   wait(conns) ◀──────────┼── "R"/"D" ───┤  run_branch per index   │
    │   EOF on conn = death    │   records    │  slot[0] = running index│
    │ WorkerPool.reap: wait4 ──┼── exit code, peak RSS (rusage)          │
    └──────────────────────────┘              └─────────────────────────┘

Why fork and our own bookkeeping instead of ``multiprocessing.Pool``: a replacement
worker must start in milliseconds (re-dispatch after a crash), a death must be seen
through the pipe itself (EOF, no polling), and ``os.wait4`` gives the dead worker's exit
status *and* peak RSS, which the crash report needs.  Each child closes the driver's
ends of its siblings' pipes, so a dead driver means EOF for every worker.
"""

from __future__ import annotations

import mmap
import os
import signal
import sys
import time
import warnings
from multiprocessing import Pipe
from typing import Any

import psutil

from durable_mp.engine import wire
from durable_mp.engine.worker import IDLE, SLOT_FORMAT, worker_main

SLOT_BYTES = 16
KILL_WAIT_SECONDS = 5.0


class Worker:
    """Driver-side handle of one worker process."""

    __slots__ = ("pid", "conn", "slot", "index_view", "tokens", "task", "queued", "watch", "proc", "cpu_mark",
                 "started")

    def __init__(self, pid: int, conn: Any, slot: mmap.mmap) -> None:
        self.pid = pid
        self.conn = conn
        self.slot = slot
        self.index_view = memoryview(slot).cast(SLOT_FORMAT)
        self.tokens: set[str] = set()
        self.task: Any = None
        self.queued: Any = None  # the next chunk, already in the pipe (map prefetch)
        self.watch: tuple | None = None  # (step record, deadline or None)
        self.proc: psutil.Process | None = None
        self.cpu_mark: tuple[float, float] | None = None
        self.started = time.monotonic()

    def send(self, msg: tuple) -> None:
        wire.send(self.conn, msg, gathered=True)

    def running_index(self) -> int | None:
        value = self.index_view[0]
        return None if value == IDLE else value

    def process(self) -> psutil.Process:
        if self.proc is None:
            self.proc = psutil.Process(self.pid)
        return self.proc

    def rss(self) -> int:
        try:
            return self.process().memory_info().rss
        except psutil.Error:
            return 0

    def state(self) -> str:
        try:
            return self.process().status()
        except psutil.Error:
            return psutil.STATUS_DEAD

    def cpu_seconds(self) -> float:
        try:
            t = self.process().cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0


class Death:
    """How a worker ended: exit code or signal, and its peak RSS in bytes."""

    __slots__ = ("pid", "exitcode", "signal", "peak_rss")

    def __init__(self, pid: int, status: int | None, peak_rss: int) -> None:
        self.pid = pid
        self.exitcode = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
        self.signal = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
        self.peak_rss = peak_rss

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            text = f"killed by {name}(-{self.signal})"
        else:
            text = f"exit code {self.exitcode}"
        text += f", peak RSS {self.peak_rss / 2**20:.1f} MiB"
        if self.signal == signal.SIGKILL:
            text += " (out of memory? the OOM killer sends SIGKILL)"
        return text


class WorkerPool:
    """A set of forked workers owned by one driver for one execution."""

    def __init__(self, settings: dict) -> None:
        self.settings = settings
        self.workers: list[Worker] = []
        self.by_fd: dict[int, Worker] = {}
        self.parent_pid = os.getpid()
        self.spawned = 0

    def __len__(self) -> int:
        return len(self.workers)

    def spawn(self) -> Worker:
        parent_conn, child_conn = Pipe(duplex=True)
        slot = mmap.mmap(-1, SLOT_BYTES)
        memoryview(slot).cast(SLOT_FORMAT)[0] = IDLE
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():
            # Python >= 3.12 warns when forking a process with threads (the store's
            # committer).  The child never touches the store, its locks or its thread: it
            # only runs worker_main on objects created after the fork.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork.*")
            pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                parent_conn.close()
                for other in self.workers:
                    other.conn.close()
                worker_main(child_conn, slot, self.parent_pid, self.settings)
            except BaseException:  # noqa: BLE001
                code = 1
                try:
                    import traceback

                    traceback.print_exc()
                except BaseException:  # noqa: BLE001
                    pass
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        child_conn.close()
        worker = Worker(pid, parent_conn, slot)
        self.workers.append(worker)
        self.by_fd[parent_conn.fileno()] = worker
        self.spawned += 1
        return worker

    def ensure(self, count: int) -> None:
        while len(self.workers) < count:
            self.spawn()

    def _forget(self, worker: Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        try:
            self.by_fd.pop(worker.conn.fileno(), None)
        except (OSError, ValueError):
            self.by_fd = {fd: w for fd, w in self.by_fd.items() if w is not worker}
        try:
            worker.conn.close()
        except OSError:
            pass

    def reap(self, worker: Worker, *, block: bool = True) -> Death:
        """Collect a dead (or killed) worker's status and peak RSS; drop it from the pool."""
        self._forget(worker)
        status, maxrss_kib = None, 0
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        while True:
            try:
                pid, status, usage = os.wait4(worker.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                break
            if pid == worker.pid:
                maxrss_kib = usage.ru_maxrss
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)
        return Death(worker.pid, status, maxrss_kib * 1024)

    def kill(self, worker: Worker) -> Death:
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.reap(worker)

    def close(self) -> None:
        """Ask idle workers to quit, kill the rest; leave no process behind."""
        for worker in list(self.workers):
            if worker.task is None:
                try:
                    worker.send(("Q",))
                except OSError:
                    pass
        deadline = time.monotonic() + 1.0
        for worker in list(self.workers):
            if worker.task is None:
                while time.monotonic() < deadline:
                    pid, _ = os.waitpid(worker.pid, os.WNOHANG)
                    if pid:
                        self._forget(worker)
                        break
                    time.sleep(0.002)
        for worker in list(self.workers):
            self.kill(worker)
