"""Worker processes: start, watch, kill and replace them.

::

    driver                                    worker (forked)
    ┌──────────────────────────┐  RunChunk    ┌─────────────────────────┐
    │ Dispatcher ──wire.send───┼─────────────▶│ reader thread → inbox    │
    │   wait(conns+sentinels) ◀┼── Records ───┤ main: run_branch / index │
    │   sentinel (pidfd) = death│  ChunkDone  │ slot[0] = running index  │
    │ WorkerPool.reap: wait4 ──┼── exit code, peak RSS (rusage)          │
    └──────────────────────────┘              └─────────────────────────┘

Why fork and our own bookkeeping instead of ``multiprocessing.Pool``: a replacement
worker must start in milliseconds (re-dispatch after a crash), and ``os.wait4`` gives
the dead worker's exit status *and* peak RSS, which the crash report needs.  A death is
seen from the process itself (a pidfd, readable once the process has exited), as
``concurrent.futures`` watches process sentinels: waiting for EOF on the pipe would
wait for every helper process the worker forked, since they inherit the pipe.
Each child closes the driver's ends of its siblings' pipes.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import sys
import time
import warnings
from multiprocessing import Pipe
from typing import Any

import psutil

from durable_mp.engine import wire
from durable_mp.engine.lifecycle import WorkerState, check_worker_move
from durable_mp.engine.protocol import Quit
from durable_mp.engine.worker import IDLE, SLOT_FORMAT, worker_main

SLOT_BYTES = 16
KILL_WAIT_SECONDS = 0.5  # after SIGKILL, wait this long for the exit before reaping it later
QUIT_WAIT_SECONDS = 1.0


class Worker:
    """Driver-side handle of one worker process and its state (``lifecycle.WorkerState``)."""

    __slots__ = ("pid", "conn", "slot", "index_view", "tokens", "task", "queued", "watches", "proc", "cpu_mark",
                 "started", "sentinel", "status", "_sentinel_owned")

    def __init__(self, pid: int, conn: Any, slot: mmap.mmap) -> None:
        self.pid = pid
        self.conn = conn
        self.slot = slot
        self.index_view = memoryview(slot).cast(SLOT_FORMAT)
        self.tokens: set[str] = set()
        self.task: Any = None
        self.queued: Any = None  # the next chunk, already in the pipe (prefetch)
        self.watches: dict[int, Any] = {}  # watch id -> dispatcher.Watch (steps with a timeout or memory watch)
        self.proc: psutil.Process | None = None
        self.cpu_mark: tuple[float, float] | None = None
        self.started = time.monotonic()
        self.status = WorkerState.STARTING
        self.sentinel, self._sentinel_owned = _sentinel(pid, conn)
        os.set_blocking(conn.fileno(), False)

    def move(self, to: WorkerState) -> None:
        check_worker_move(self.status, to, self.pid)
        self.status = to

    def send(self, msg: Any) -> None:
        wire.send(self.conn, msg, gathered=True, sentinel=self.sentinel)

    def recv(self) -> Any:
        return wire.recv(self.conn, self.sentinel)

    def is_dead(self) -> bool:
        """True once the process has exited (its sentinel is readable)."""
        return bool(select.select([self.sentinel], [], [], 0)[0])

    def running_index(self) -> int | None:
        value = self.index_view[0]
        return None if value == IDLE else int(value)

    def process(self) -> psutil.Process:
        if self.proc is None:
            self.proc = psutil.Process(self.pid)
        return self.proc

    def owned_memory(self) -> int:
        """Memory the worker owns: USS, not RSS, so pages shared copy-on-write with the driver do not count.

        RSS is an upper bound of USS and costs far less to read (``smaps`` is walked for
        USS), so USS is read only when RSS alone is over ``limit``.
        """
        try:
            return int(self.process().memory_full_info().uss)
        except psutil.Error:
            return 0

    def rss(self) -> int:
        try:
            return int(self.process().memory_info().rss)
        except psutil.Error:
            return 0

    def over(self, limit: int) -> int:
        """The owned memory if it is over ``limit``, else 0."""
        if self.rss() <= limit:
            return 0
        owned = self.owned_memory()
        return owned if owned > limit else 0

    def state(self) -> str:
        try:
            return str(self.process().status())
        except psutil.Error:
            return str(psutil.STATUS_DEAD)

    def cpu_seconds(self) -> float:
        try:
            t = self.process().cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    def close_handles(self) -> None:
        for close in (self.conn.close, lambda: os.close(self.sentinel) if self._sentinel_owned else None):
            try:
                close()
            except OSError:
                pass


def _sentinel(pid: int, conn: Any) -> tuple[int, bool]:
    """A pidfd for ``pid`` (Linux 5.3+); without one, the pipe's EOF is the best there is."""
    try:
        return os.pidfd_open(pid), True
    except (AttributeError, OSError):
        return conn.fileno(), False


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

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.workers: list[Worker] = []
        self.unreaped: set[int] = set()
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
                    other.close_handles()
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
        worker.move(WorkerState.IDLE)
        self.workers.append(worker)
        self.spawned += 1
        return worker

    def ensure(self, count: int) -> None:
        while len(self.workers) < count:
            self.spawn()

    def _forget(self, worker: Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if worker.status is not WorkerState.DEAD:
            worker.move(WorkerState.DEAD)
        worker.close_handles()

    def reap(self, worker: Worker) -> Death:
        """Collect a dead (or killed) worker's status and peak RSS; drop it from the pool.

        Never blocks for long: a process that has not exited within ``KILL_WAIT_SECONDS``
        (uninterruptible sleep in the kernel) is collected later by ``reap_zombies``.
        """
        self._forget(worker)
        status, maxrss_kib = None, 0
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        while True:
            try:
                pid, status, usage = os.wait4(worker.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == worker.pid:
                maxrss_kib = usage.ru_maxrss
                break
            if time.monotonic() > deadline:
                self.unreaped.add(worker.pid)
                status = None
                break
            time.sleep(0.001)
        return Death(worker.pid, status, maxrss_kib * 1024)

    def reap_zombies(self, wait_seconds: float = 0.0) -> None:
        """Collect workers that were killed but had not exited yet."""
        deadline = time.monotonic() + wait_seconds
        while self.unreaped:
            for pid in list(self.unreaped):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    self.unreaped.discard(pid)
            if not self.unreaped or time.monotonic() >= deadline:
                return
            time.sleep(0.005)

    def kill(self, worker: Worker) -> Death:
        if worker.status is not WorkerState.DEAD:
            worker.move(WorkerState.DRAINING)
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.reap(worker)

    def close(self) -> None:
        """Ask idle workers to quit, kill the rest; leave no process behind."""
        quitting = []
        for worker in list(self.workers):
            if worker.task is None and worker.status is WorkerState.IDLE:
                worker.move(WorkerState.DRAINING)
                try:
                    worker.send(Quit())
                    quitting.append(worker)
                except (OSError, EOFError):
                    pass
        deadline = time.monotonic() + QUIT_WAIT_SECONDS
        for worker in quitting:
            while time.monotonic() < deadline and not worker.is_dead():
                select.select([worker.sentinel], [], [], max(0.0, deadline - time.monotonic()))
            if worker.is_dead():
                self.reap(worker)
        for worker in list(self.workers):
            self.kill(worker)
        self.reap_zombies(wait_seconds=KILL_WAIT_SECONDS * 10)
