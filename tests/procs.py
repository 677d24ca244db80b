"""Process hygiene for tests: find (and kill) children a test left behind."""

from __future__ import annotations

import os
import time

import psutil


def leftover_children(seconds: float = 5.0) -> list:
    """Children still alive after up to ``seconds``; they are killed before returning."""
    me = psutil.Process(os.getpid())
    deadline = time.monotonic() + seconds
    alive = []
    while time.monotonic() < deadline:
        alive = []
        for proc in me.children(recursive=True):
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    if proc.ppid() == me.pid:
                        os.waitpid(proc.pid, os.WNOHANG)  # our own dead child: reap it
                    continue
                if any("resource_tracker" in part for part in proc.cmdline()):
                    continue  # multiprocessing's / loky's tracker lives as long as the test runner, by design
                alive.append(proc)
            except (psutil.Error, ChildProcessError):
                pass
        if not alive:
            break
        time.sleep(0.05)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return alive


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: a driver started with ``start_new_session``
    and every worker or helper it started."""
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except (OSError, psutil.Error):
            pass
    return out
