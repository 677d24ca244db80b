"""``wire.wait``: the dispatcher's wait on pipes and sentinels, answering as ``multiprocessing.connection.wait`` does."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from multiprocessing.connection import wait as standard_wait

import pytest

from durable_mp.engine.wire import wait


@pytest.mark.process_free
def test_a_connection_is_ready_when_it_has_data_or_its_other_end_closed():
    a, b = multiprocessing.Pipe()
    c, d = multiprocessing.Pipe()
    try:
        assert wait([a, c], timeout=0) == standard_wait([a, c], timeout=0) == []
        b.send_bytes(b"x")
        assert wait([a, c], timeout=0) == [a] == standard_wait([a, c], timeout=0)
        d.close()  # end of file counts as ready: the reader then sees EOFError
        assert set(map(id, wait([a, c], timeout=0))) == {id(a), id(c)}
    finally:
        for conn in (a, b, c):
            conn.close()


@pytest.mark.process_free
def test_a_descriptor_and_a_connection_on_the_same_fd_are_both_returned():
    a, b = multiprocessing.Pipe()
    try:
        b.send_bytes(b"x")
        ready = wait([a, a.fileno()], timeout=0)
        assert len(ready) == 2 and ready[0] is a and ready[1] == a.fileno()
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_a_pidfd_is_ready_once_its_process_ended():
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd on this platform")  # the pool then watches the pipe, tested above
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    pidfd = os.pidfd_open(proc.pid)
    try:
        assert wait([pidfd], timeout=0.05) == []
        proc.stdin.close()
        assert wait([pidfd], timeout=20) == [pidfd]
    finally:
        proc.kill()
        proc.wait()
        os.close(pidfd)
