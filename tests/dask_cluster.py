"""A real Dask cluster for tests: a scheduler and workers as separate processes, on loopback.

Started from the command line (``dask scheduler``, ``dask worker``), each in its own
session so a test can kill exactly one of them by signal, and ``close`` kills what is
left.  Workers see this tree first on their path, as the test runner does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import distributed

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# Dask gives up on a task whose worker died after one more try: a branch that kills its worker is charged quickly.
ALLOWED_FAILURES = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}


class RealCluster:
    """``dask scheduler`` plus ``workers`` × ``dask worker --nthreads 1``; ``env`` adds Dask config variables."""

    def __init__(self, tmp: Path, workers: int = 2, *, nanny: bool = True, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.nanny = nanny
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
                    "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "error", **(env or {})}
        self.scheduler_file = tmp / "scheduler.json"
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.address = ""
        self.size = workers  # workers a restart starts again
        self.start_scheduler()
        for _ in range(workers):
            self.add_worker()

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            return subprocess.Popen([sys.executable, "-m", *args], env=self.env, cwd=self.tmp, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()

    def start_scheduler(self, port: int = 0) -> None:
        """(Re)start the scheduler; ``port`` reuses a dead scheduler's port so clients and workers find it again."""
        self.scheduler_file.unlink(missing_ok=True)
        self.scheduler = self._spawn(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
                                      "--no-dashboard", "--scheduler-file", str(self.scheduler_file)], "scheduler")
        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists() or not self.scheduler_file.stat().st_size:
            if time.monotonic() > deadline or self.scheduler.poll() is not None:
                raise RuntimeError("dask scheduler did not start: " + (self.tmp / "scheduler.log").read_text())
            time.sleep(0.05)
        time.sleep(0.05)  # the file is written in one go, but give the writer a moment to close it
        self.address = json.loads(self.scheduler_file.read_text())["address"]

    def add_worker(self) -> subprocess.Popen:
        proc = self._spawn(["distributed.cli.dask_worker", self.address, "--nthreads", "1", "--host", "127.0.0.1",
                            "--no-dashboard", "--nanny" if self.nanny else "--no-nanny", "--death-timeout", "120",
                            "--local-directory", str(self.tmp / "workers")], f"worker{len(self.workers)}")
        self.workers.append(proc)
        return proc

    def client(self, workers: int | None = None, timeout: float = 30) -> distributed.Client:
        """A client; ``timeout`` also bounds how long it tries to reconnect to a lost scheduler."""
        client = distributed.Client(self.address, timeout=timeout)
        if workers:
            client.wait_for_workers(workers, timeout=90)
        return client

    def worker_pids(self, client: distributed.Client) -> list[int]:
        """Pids of the worker processes themselves (a nanny's child), the ones a fault kills."""
        return sorted(client.run(os.getpid).values())

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        os.killpg(self.scheduler.pid, signal.SIGKILL)
        self.scheduler.wait(10)

    def restart(self) -> None:
        """What a supervisor does after the scheduler died: a new one on the same port (clients reconnect
        to it), and new workers (``dask worker`` exits when its scheduler connection breaks)."""
        port = int(self.address.rsplit(":", 1)[1])
        workers = self.size
        if self.scheduler is not None and self.scheduler.poll() is None:
            self.kill_scheduler()
        self.start_scheduler(port)
        for _ in range(workers):
            self.add_worker()

    def close(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            if proc is None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        self.workers = []
        self.scheduler = None
