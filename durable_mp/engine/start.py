"""How a worker process starts: ``fork``, ``forkserver`` or ``spawn``.

``fork``
    ``os.fork`` in the driver: the fastest start, copy-on-write memory, but the child is
    a copy of a process whose other threads (the store's commit thread, tqdm's monitor)
    may hold locks at that moment.  Python 3.12+ warns about exactly that; durable_mp
    does not silence the warning (docs/handlers.md, "Start methods").
``spawn``
    A fresh interpreter, started by ``os.posix_spawn`` (fork+exec in C, safe while the
    driver has threads).  It imports durable_mp and reads its settings from the pipe.
    Nothing else of the driver is inherited: branches arrive cloudpickled, so closures
    from ``__main__``, ``python -c`` and notebooks work, and the driver's main module is
    *not* re-imported (unlike ``multiprocessing``'s spawn, no ``__main__`` guard needed).
``forkserver``
    One spawned, single-threaded server per pool that has durable_mp imported and forks
    each worker on request.  It is the workers' parent: it reaps them with ``os.wait4``
    and reports each exit status and peak RSS to the driver, so a crash report is as
    complete as under ``fork``.

Every method hands the worker the same two things: one end of a socket pair (the pipe
protocol of ``wire``) and a shared-memory slot holding the index of the running branch
(an anonymous mapping under ``fork``, a ``memfd`` passed by descriptor otherwise).
"""

from __future__ import annotations

import functools
import mmap
import os
import pickle
import select
import signal
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from durable_mp.engine.state import CONTEXT_MODULE
from durable_mp.engine.worker import worker_main
from durable_mp.engine.worker_process import PARENT_CHECK_SECONDS
from durable_mp.engine.worker_state import IDLE, SLOT_FORMAT

START_METHODS = ("fork", "forkserver", "spawn")
SLOT_BYTES = 24  # three int64: running index, chunk progress, durable sleeps (engine.worker)
# Imported by a spawned worker / the fork server before it serves: durable_mp.context
# registers the context factory branches are built with (engine.state).  Named, not
# imported here: the engine imports nothing above it.  Only the context: ``durable_mp``
# itself imports its public names lazily, so a worker never loads the store (lmdb,
# psutil), the dispatcher or the command line unless a branch asks for them.
PRELOAD = (CONTEXT_MODULE,)
SERVER_MESSAGE_BYTES = 1 << 20  # one request or report on the fork server's socket
_BOOT = ("import sys; sys.path.insert(0, {root!r}); "
         "from durable_mp.engine.start import {entry}; {entry}()")


def default_start_method() -> str:
    """``fork`` on Linux (fastest, measured in the bench); ``spawn`` elsewhere (macOS: no fork without exec)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def early_workers(method: str, wanted: int) -> int:
    """How many of ``wanted`` workers to start when an execution starts (spawn, forkserver).

    ``spawn``: one per CPU the driver leaves free, at least one: interpreters booting
    side by side on more CPUs than are free only slow the first one down (on 2 CPUs a
    second boot delayed the first branch by a third); the dispatcher starts the rest when
    a batch has work for them.  ``forkserver``: all of them, since one interpreter boots
    whatever the count and its forks cost milliseconds.
    """
    if method == "forkserver":
        return wanted
    return max(1, min(wanted, usable_cpus() - 1))


def check_start_method(method: str | None) -> str:
    """The method to use; ``ValueError`` for one this platform does not have."""
    if method is None:
        return default_start_method()
    if method not in START_METHODS:
        raise ValueError(f"start_method must be one of {', '.join(START_METHODS)}, got {method!r}")
    if method != "spawn" and not hasattr(os, "fork"):
        raise ValueError(f"start_method {method!r} needs os.fork, which this platform does not have")
    return method


def new_slot() -> tuple[mmap.mmap, int]:
    """A shared slot for the running branch index, and a descriptor another process can map it by."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("durable_mp-slot")
    else:  # macOS: an unlinked temporary file does the same
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, SLOT_BYTES)
    slot = mmap.mmap(fd, SLOT_BYTES)
    memoryview(slot).cast(SLOT_FORMAT)[0] = IDLE
    return slot, fd


def socket_pair() -> tuple[Connection, Connection]:
    """Two connected ``Connection`` objects over a Unix socket pair (what ``Pipe(duplex=True)`` makes)."""
    a, b = socket.socketpair()
    return Connection(a.detach()), Connection(b.detach())


def _interpreter_args(entry: str) -> list[str]:
    """``python [flags] -c <boot>``: the driver's ``-X``/``-W`` flags, durable_mp importable from where it is."""
    import subprocess  # only for the flag helper multiprocessing uses too

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    return [sys.executable, *flags, "-c", _BOOT.format(root=root, entry=entry)]


def spawn_process(entry: str, fds: list[int], argv: list[str]) -> int:
    """Start ``python -c <entry>()`` with ``fds`` inherited (their numbers in ``argv``); return its pid."""
    for fd in fds:
        os.set_inheritable(fd, True)
    try:
        # its own process group from the first instruction: a Ctrl-C at the terminal reaches only the driver
        return os.posix_spawn(sys.executable, _interpreter_args(entry) + argv, os.environ, setpgroup=0,
                              file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)])
    finally:
        for fd in fds:
            os.set_inheritable(fd, False)


def boot_message(parent_pid: int, settings: dict[str, Any]) -> dict[str, Any]:
    """What a spawned process needs from the driver before it serves."""
    return {"sys_path": list(sys.path), "parent_pid": parent_pid, "settings": settings, "preload": PRELOAD}


def _apply_boot(boot: dict[str, Any]) -> None:
    """Make the driver's modules importable (branches pickled by reference) and register the context."""
    seen = set(boot["sys_path"])
    sys.path[:] = list(boot["sys_path"]) + [p for p in sys.path if p not in seen]
    for name in boot["preload"]:
        __import__(name)


def run_worker(body: Callable[[], None]) -> None:
    """Run a worker body and end the process: exit code 0, or 1 with the traceback on stderr."""
    code = 0
    try:
        body()
    except BaseException:  # noqa: BLE001
        code = 1
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def spawned_worker() -> None:
    """Entry point of a ``spawn`` worker: ``argv`` = pipe fd, slot fd; the boot message comes first on the pipe."""
    from durable_mp.engine import wire

    def body() -> None:
        conn = Connection(int(sys.argv[1]))
        slot_fd = int(sys.argv[2])
        slot = mmap.mmap(slot_fd, SLOT_BYTES)
        os.close(slot_fd)
        boot = wire.recv(conn)
        _apply_boot(boot)
        worker_main(conn, slot, boot["parent_pid"], boot["settings"])

    run_worker(body)


# -- forkserver -------------------------------------------------------------------------------


def _seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    """A socket pair that keeps message boundaries (Linux: SEQPACKET, which also reports EOF)."""
    try:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except (AttributeError, OSError):
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)


class ForkServer:
    """Driver side of one fork server: start workers through it, learn how they ended."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.sock, theirs = _seqpacket_pair()
        try:
            self.pid = spawn_process("fork_server", [theirs.fileno()], [str(theirs.fileno())])
        finally:
            theirs.close()
        self.sock.sendall(pickle.dumps(boot_message(os.getpid(), settings)))
        self.deaths: dict[int, tuple[int, int]] = {}  # pid -> (wait status, peak RSS in KiB)
        self.requested = 0  # workers asked for whose pid has not been read yet
        self.closed = False

    def start(self, conn_fd: int, slot_fd: int) -> int:
        """Fork a worker serving ``conn_fd`` with its slot ``slot_fd``; return its pid."""
        self.request(conn_fd, slot_fd)
        return self.started()

    def request(self, conn_fd: int, slot_fd: int) -> None:
        """Ask for a worker without waiting: a server still booting finds the request when it serves.

        The kernel holds the descriptors in flight, so the caller may close its copies at once.
        """
        socket.send_fds(self.sock, [b"start"], [conn_fd, slot_fd])
        self.requested += 1

    def started(self) -> int:
        """The pid of the oldest requested worker not yet answered (the server answers in order)."""
        while True:
            msg = self._read(None)
            if msg[0] == "started":
                self.requested -= 1
                return int(msg[1])

    def kill(self) -> None:
        """End the server at once (a worker it started dies with it: parent-death signal, pipe EOF)."""
        if not self.closed:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.close()

    def death(self, pid: int, wait_seconds: float) -> tuple[int, int] | None:
        """``(status, peak RSS KiB)`` of a worker once the server has reaped it, waiting up to ``wait_seconds``."""
        import time

        deadline = time.monotonic() + wait_seconds
        while pid not in self.deaths and not self.closed:
            left = deadline - time.monotonic()
            try:
                if left < 0 or not self._read(max(left, 0.0)):
                    break
            except (EOFError, OSError):  # the server died: its workers died with it, unreported
                self.close()
        return self.deaths.pop(pid, None)

    def _read(self, timeout: float | None) -> tuple[Any, ...]:
        """One message from the server (a death is filed in ``deaths``); ``()`` on timeout."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return ()
        data = self.sock.recv(SERVER_MESSAGE_BYTES)
        if not data:
            raise EOFError("the fork server is gone")
        msg: tuple[Any, ...] = pickle.loads(data)
        if msg[0] == "dead":
            self.deaths[int(msg[1])] = (int(msg[2]), int(msg[3]))
        return msg

    def close(self) -> None:
        """EOF tells the server to kill what is left and exit; it is the driver's child, so reap it."""
        if self.closed:
            return
        self.closed = True
        self.sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass

    def alive(self) -> bool:
        if self.closed:
            return False
        try:
            return os.waitpid(self.pid, os.WNOHANG)[0] == 0
        except ChildProcessError:
            return False


def fork_server() -> None:
    """Entry point of the fork server (single-threaded, so every fork is of a process without threads)."""
    from durable_mp.engine.worker_process import die_with_parent

    sock = socket.socket(fileno=int(sys.argv[1]))
    boot = pickle.loads(sock.recv(SERVER_MESSAGE_BYTES))
    _apply_boot(boot)
    driver = boot["parent_pid"]
    die_with_parent(driver, watch_thread=False)  # no thread here: the select timeout below watches
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's; it stops the server
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so SIGCHLD writes to the wakeup fd
    children: set[int] = set()

    def reap() -> None:
        while children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            children.discard(pid)
            sock.sendall(pickle.dumps(("dead", pid, status, usage.ru_maxrss)))

    try:
        while True:
            ready: list[Any] = select.select([sock.fileno(), wake_r], [], [], PARENT_CHECK_SECONDS)[0]
            if wake_r in ready:
                os.read(wake_r, 512)
            reap()
            if os.getppid() != driver:
                break
            if sock.fileno() not in ready:
                continue
            _msg, fds, _flags, _addr = socket.recv_fds(sock, SERVER_MESSAGE_BYTES, 2)
            if not fds:  # EOF: the driver closed the pool
                break
            pid = os.fork()
            if pid == 0:
                sock.close()
                os.close(wake_r)
                os.close(wake_w)
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                run_worker(functools.partial(_forked_worker, fds[0], fds[1], boot["settings"]))
            for fd in fds:
                os.close(fd)
            children.add(pid)
            sock.sendall(pickle.dumps(("started", pid)))
    except (OSError, EOFError):
        pass
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(0)


def _forked_worker(conn_fd: int, slot_fd: int, settings: dict[str, Any]) -> None:
    slot = mmap.mmap(slot_fd, SLOT_BYTES)
    os.close(slot_fd)
    # The server is the parent; it exits when the driver does, and its workers with it.
    worker_main(Connection(conn_fd), slot, os.getppid(), settings)
