"""The pool-growth check reads a busy worker's CPU time once per sample period, not per message.

Reading ``/proc/<pid>/stat`` costs an open, a read and a parse; the dispatcher passes
through its watch after every message, so a read there per message cost a tiny-item map
about 8% of the driver's time.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from durable_mp.engine.supervision import Supervisor
from durable_mp.engine.faults import CPU_SAMPLE_SECONDS

pytestmark = pytest.mark.process_free  # no test here starts a process


class FakeWorker:
    pid = 4242

    def __init__(self) -> None:
        self.task = object()
        self.cpu_mark: tuple[float, float] | None = None
        self.reads = 0
        self.cpu = 0.0
        self.durable_sleep = False

    def running_index(self) -> int:
        return 0

    def cpu_seconds(self) -> float:
        self.reads += 1
        return self.cpu

    def state(self) -> str:
        return "sleeping"

    def sleeping(self) -> bool:  # in a durable sleep (a retry delay, a wait)?
        return self.durable_sleep


def test_cpu_time_is_read_once_per_sample_period():
    worker = FakeWorker()
    fake = SimpleNamespace(pool=SimpleNamespace(workers=[worker]), io_waiting={})
    steps = 50
    for step in range(steps):  # 50 messages within one sample period, then one past it
        Supervisor.sample_cpu(fake, 100.0 + step * CPU_SAMPLE_SECONDS / steps)  # type: ignore[arg-type]
    Supervisor.sample_cpu(fake, 100.0 + 1.5 * CPU_SAMPLE_SECONDS)  # type: ignore[arg-type]
    assert worker.reads == 2  # the mark, then the sample
    assert fake.io_waiting == {worker.pid: True}  # no CPU used over the period: waiting, not computing


def test_a_cpu_bound_worker_is_not_marked_waiting():
    worker = FakeWorker()
    fake = SimpleNamespace(pool=SimpleNamespace(workers=[worker]), io_waiting={})
    Supervisor.sample_cpu(fake, 10.0)  # type: ignore[arg-type]
    worker.cpu = 2 * CPU_SAMPLE_SECONDS  # busy the whole period
    Supervisor.sample_cpu(fake, 10.0 + 2 * CPU_SAMPLE_SECONDS)  # type: ignore[arg-type]
    assert fake.io_waiting == {worker.pid: False}


def test_a_worker_in_a_durable_sleep_is_not_marked_waiting():
    """Issue 19 §9: a retry delay leaves the worker idle on the CPU, but the attempt it
    sleeps before is as CPU-bound as the last: no worker may be added for it."""
    worker = FakeWorker()
    worker.durable_sleep = True
    fake = SimpleNamespace(pool=SimpleNamespace(workers=[worker]), io_waiting={})
    Supervisor.sample_cpu(fake, 10.0)  # type: ignore[arg-type]
    Supervisor.sample_cpu(fake, 10.0 + 2 * CPU_SAMPLE_SECONDS)  # type: ignore[arg-type]
    assert fake.io_waiting == {worker.pid: False}
