"""Worker processes: start, watch, kill and replace them.

::

    driver                                    worker (fork / forkserver / spawn: engine.start)
    ┌──────────────────────────┐  RunChunk    ┌─────────────────────────┐
    │ Dispatcher ──wire.send───┼─────────────▶│ reader thread → inbox    │
    │   wait(conns+sentinels) ◀┼── Records ───┤ main: run_branch / index │
    │   sentinel (pidfd) = death│  ChunkDone  │ slot: running index,     │
    │                          │             │  progress, durable sleeps│
    │ WorkerPool.reap: wait4 ──┼── exit code, peak RSS (rusage)          │
    └──────────────────────────┘              └─────────────────────────┘

Why our own bookkeeping instead of ``multiprocessing.Pool``: a replacement worker must
start in milliseconds under ``fork`` (re-dispatch after a crash), and ``os.wait4`` gives
the dead worker's exit status *and* peak RSS, which the crash report needs (under
``forkserver`` the server is the parent: it runs ``wait4`` and reports both).  A death is
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
from multiprocessing import Pipe
from typing import Any

import psutil

from durable_mp.engine import wire
from durable_mp.engine.lifecycle import WorkerState, check_worker_move
from durable_mp.engine.protocol import Quit, RunChunk, Sequence
from durable_mp.engine.start import (
    SLOT_BYTES,
    ForkServer,
    boot_message,
    check_start_method,
    new_slot,
    run_worker,
    socket_pair,
    spawn_process,
)
from durable_mp.engine.wire import send as wire_send
from durable_mp.engine.worker import worker_main
from durable_mp.engine.worker_state import IDLE, PROGRESS_SHIFT, SLEEPING, SLOT_FORMAT

__all__ = ["SLOT_BYTES", "Death", "Worker", "WorkerPool"]
KILL_WAIT_SECONDS = 0.5  # after SIGKILL, wait this long for the exit before reaping it later
QUIT_WAIT_SECONDS = 1.0
PROGRESS_MASK = (1 << PROGRESS_SHIFT) - 1
class Worker:
    """Driver-side handle of one worker process and its state (``lifecycle.WorkerState``)."""

    __slots__ = ("pid", "conn", "slot", "index_view", "tokens", "task", "queued", "watches", "proc", "cpu_mark",
                 "started", "sentinel", "status", "_sentinel_owned", "used", "sequence", "heard")

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
        self.used = False  # sent anything yet?  An unused worker holds nothing: closing kills it at once
        self.heard = False  # received anything from it yet?  Until then it may still be booting (spawn)
        self.sequence = Sequence(f"worker pid {pid}")
        self.sentinel, self._sentinel_owned = _sentinel(pid, conn)
        os.set_blocking(conn.fileno(), False)

    def move(self, to: WorkerState) -> None:
        check_worker_move(self.status, to, self.pid)
        self.status = to

    def send(self, msg: Any) -> None:
        # only a chunk carrying the batch payload has an out-of-band frame: every other message
        # takes the C pickler (the frame-aware one calls back into Python for every object)
        gathered = msg.__class__ is RunChunk and msg.payload is not None
        self.used = True
        shared = wire.shared_frame(msg.payload) if gathered else None
        if shared is None:
            wire.send(self.conn, msg, gathered=gathered, sentinel=self.sentinel)
            return
        # a large payload is in a memory file: its descriptor travels, not its bytes (wire.Shared)
        try:
            wire.send(self.conn, msg._replace(payload=shared), gathered=True, sentinel=self.sentinel)
        finally:
            shared.close()

    def recv(self) -> Any:
        """The worker's next message; ``ProtocolError`` if it is not the one numbered next."""
        msg = self.sequence.check(wire.recv(self.conn, self.sentinel))
        self.heard = True
        return msg

    def is_dead(self) -> bool:
        """True once the process has exited (its sentinel is readable)."""
        return bool(select.select([self.sentinel], [], [], 0)[0])

    def running_index(self) -> int | None:
        value = self.index_view[0]
        return None if value == IDLE else int(value)

    def sleeping(self) -> bool:
        """Is one of the worker's threads in a durable sleep (a retry delay, a wait)?"""
        return bool(self.index_view[SLEEPING])

    def begun(self, task_id: int, size: int) -> int:
        """How many of the ``size`` items of chunk ``task_id``, in order, the worker has begun.

        Task ids grow, so a slot naming a later chunk (prefetched, its ChunkDone for this one
        not read yet) means the worker went through all of this one; an earlier one, none.
        """
        value = self.index_view[1]
        slot_task = value >> PROGRESS_SHIFT
        if slot_task == task_id:
            return value & PROGRESS_MASK
        return size if slot_task > task_id else 0

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

    __slots__ = ("pid", "exitcode", "signal", "peak_rss", "known")

    def __init__(self, pid: int, status: int | None, peak_rss: int) -> None:
        self.pid = pid
        self.known = status is not None
        self.exitcode = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
        self.signal = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
        self.peak_rss = peak_rss

    def describe(self) -> str:
        if not self.known:
            return "exit status and peak RSS not known (the process had not been reaped yet)"
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
    """The workers owned by one driver for one execution, started by ``start_method`` (``engine.start``)."""

    def __init__(self, settings: dict[str, Any], start_method: str | None = None) -> None:
        self.settings = settings
        self.start_method = check_start_method(start_method)
        self.workers: list[Worker] = []
        self.unreaped: set[int] = set()
        self.parent_pid = os.getpid()
        self.spawned = 0
        self.server: ForkServer | None = None
        self.requested: list[tuple[Any, mmap.mmap]] = []  # (pipe, slot) of fork-server workers not answered yet
        self.quitting: list[Worker] = []  # asked to quit by begin_close, not yet reaped
        self.started_early = 0  # workers begun with the execution (spawn, forkserver), ``start_early``

    def __len__(self) -> int:
        return len(self.workers)

    def spawn(self) -> Worker:
        if self.start_method == "forkserver":
            self._request()
            self._collect()
            return self.workers[-1]
        if self.start_method == "fork":
            pid, conn, slot = self._fork()
        else:
            pid, conn, slot = self._start_fresh()
        return self._add(pid, conn, slot)

    def _add(self, pid: int, conn: Any, slot: mmap.mmap) -> Worker:
        worker = Worker(pid, conn, slot)
        worker.move(WorkerState.IDLE)
        self.workers.append(worker)
        self.spawned += 1
        return worker

    def start(self, count: int) -> None:
        """Begin starting workers up to ``count``, waiting for none of them to be ready.

        Called when an execution starts, so the workers boot while the driver opens the
        execution and runs the handler's first steps.  A spawned interpreter boots on
        its own (its boot message and first chunk wait in its pipe); the fork server is
        sent requests it serves once it has booted, and ``ensure`` (at the first batch)
        collects their pids.  ``fork`` forks now.
        """
        while len(self.workers) + len(self.requested) < count:
            if self.start_method == "forkserver":
                self._request()
            else:
                self.spawn()

    def start_early(self, count: int) -> None:
        """``start(count)`` when the execution begins; the first batch waits for these ``count`` (``ensure``)."""
        self.started_early = count
        self.start(count)

    def _request(self) -> None:
        """Ask the fork server (started if there is none, or it died) for one more worker."""
        if self.server is None or not self.server.alive():
            if self.server is not None:
                self.server.close()
                self._drop_requests()  # a dead server answers nothing: those workers never existed
            self.server = ForkServer(self.settings)
        conn, child_conn = socket_pair()
        slot, slot_fd = new_slot()
        try:
            self.server.request(child_conn.fileno(), slot_fd)
        except BaseException:
            conn.close()
            raise
        finally:
            child_conn.close()
            os.close(slot_fd)
        self.requested.append((conn, slot))

    def _drop_requests(self) -> None:
        for conn, slot in self.requested:
            conn.close()
            slot.close()
        self.requested.clear()

    def _collect(self) -> None:
        """Wait for the fork server's answers to the requests sent so far, in order."""
        assert self.server is not None or not self.requested
        while self.requested:
            pid = self.server.started()  # type: ignore[union-attr]
            conn, slot = self.requested.pop(0)
            self._add(pid, conn, slot)

    def _start_fresh(self) -> tuple[int, Any, mmap.mmap]:
        """A new interpreter (``spawn``): pipe and slot passed by descriptor."""
        conn, child_conn = socket_pair()
        slot, slot_fd = new_slot()
        try:
            pid = spawn_process("spawned_worker", [child_conn.fileno(), slot_fd],
                                [str(child_conn.fileno()), str(slot_fd)])
            # the boot message waits in the socket until the new interpreter reads it
            wire_send(conn, boot_message(self.parent_pid, self.settings))
        finally:
            child_conn.close()
            os.close(slot_fd)
        return pid, conn, slot

    def _fork(self) -> tuple[int, Any, mmap.mmap]:
        """``os.fork``.  Python 3.12+ warns here when the driver has threads: not silenced
        (docs/handlers.md, "Start methods")."""
        parent_conn, child_conn = Pipe(duplex=True)
        slot = mmap.mmap(-1, SLOT_BYTES)
        memoryview(slot).cast(SLOT_FORMAT)[0] = IDLE
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child

            def body() -> None:
                parent_conn.close()
                for other in self.workers:
                    other.close_handles()
                if self.server is not None:
                    self.server.sock.close()
                worker_main(child_conn, slot, self.parent_pid, self.settings)

            run_worker(body)
        child_conn.close()
        return pid, parent_conn, slot

    def ensure(self, count: int) -> None:
        """``count`` workers, ready to be sent work (what ``start`` began is waited for here)."""
        self.start(count)
        self._collect()

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
        if self.server is not None:  # the fork server is the parent: it reaps and reports
            report = self.server.death(worker.pid, KILL_WAIT_SECONDS)
            if report is None:
                self.unreaped.add(worker.pid)
                return Death(worker.pid, None, 0)
            return Death(worker.pid, report[0], report[1] * 1024)
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
                if self.server is not None:
                    done = pid if self.server.death(pid, 0.0) is not None else 0
                    if self.server.closed:
                        done = pid  # the server killed and reaped what was left
                else:
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
        if worker.status is not WorkerState.DEAD and worker.status is not WorkerState.DRAINING:
            worker.move(WorkerState.DRAINING)  # a worker asked to quit is draining already
        try:
            if worker.status is WorkerState.DEAD:
                pass  # reaped already, its handles closed: its pid may be another process's by now
            elif worker._sentinel_owned:  # by pidfd: a fork-server worker's pid is free for reuse once reaped
                signal.pidfd_send_signal(worker.sentinel, signal.SIGKILL)
            else:
                os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.reap(worker)

    def begin_close(self) -> None:
        """Ask idle workers to quit, without waiting: they exit while the driver commits its last records.

        ``close`` waits for them (and kills the rest).
        """
        for worker in list(self.workers):
            if worker.task is None and worker.status is WorkerState.IDLE and worker.used:
                worker.move(WorkerState.DRAINING)
                try:
                    worker.send(Quit())
                    self.quitting.append(worker)
                except (OSError, EOFError):
                    pass

    def close(self) -> None:
        """Ask idle workers to quit, kill the rest; leave no process behind.  Idempotent.

        A worker never sent anything is killed without asking: it holds no work, and one
        still booting (spawn) would read the request only once its imports are done.
        """
        self.begin_close()
        quitting, self.quitting = self.quitting, []
        deadline = time.monotonic() + QUIT_WAIT_SECONDS
        for worker in quitting:
            while time.monotonic() < deadline and not worker.is_dead():
                select.select([worker.sentinel], [], [], max(0.0, deadline - time.monotonic()))
            if worker.is_dead():
                self.reap(worker)
        for worker in list(self.workers):
            self.kill(worker)
        self.reap_zombies(wait_seconds=KILL_WAIT_SECONDS * 10)
        if self.server is not None:
            if self.requested:  # a server still booting: do not wait for it, its workers die with it
                self.server.kill()
                self._drop_requests()
            self.server.close()
            self.unreaped.clear()
