"""The Dask cluster as the driver sees it: what a task's fault costs, how long to wait, which client.

``fault_of`` sorts the exception a chunk's future raised into a ``DaskFault`` (the table
in ``backends.dask``'s docstring); ``configured_wait`` reads how long a run waits for an
unavailable cluster (Dask config ``durable-mp.cluster-wait``); ``client_for`` makes or
takes the ``distributed.Client``.  ``_scheduler_allowed_failures`` runs on the scheduler,
so it lives at module level of a module the scheduler can import.
"""

from __future__ import annotations

import logging
import threading
import uuid
from concurrent.futures import CancelledError
from enum import Enum
from typing import Any

__all__ = ["CLUSTER_WAIT_KEY", "DaskFault", "client_for", "configured_wait", "drop_payload", "fault_of",
           "processing_on", "restart_worker", "submit_payload"]

log = logging.getLogger("durable_mp.dask")

CLUSTER_WAIT_KEY = "durable-mp.cluster-wait"  # Dask config: seconds a run waits for an unavailable cluster
DEFAULT_CLUSTER_WAIT = 300.0
DASK_DEFAULT_ALLOWED_FAILURES = 3  # distributed.scheduler.allowed-failures
PAYLOAD_PRIORITY = 10  # a batch's payload task runs before its chunks (which wait for it)
RESTART_SECONDS = 60.0  # a worker restarted through its nanny is back within this (else Dask removes it)
_INFRASTRUCTURE_NAMES = frozenset({"CommClosedError", "FutureCancelledError", "StreamClosedError"})


class DaskFault(Enum):
    """What ended a Dask task without its result, and so what it costs."""

    INFRASTRUCTURE = "infrastructure: back to the queue, uncharged"  # cancelled, lost, connection closed
    KILLED_CHUNK = "killed workers: its branches run again one by one, uncharged"
    KILLED_ALONE = "killed workers: charged to its one branch"
    KILLED_QUEUED = "Dask gave up on it, but it never ran: back to the queue, uncharged"
    TASK_ERROR = "the task itself failed"  # durable_mp's task code raised (the branches' own errors are records)


def fault_of(exc: BaseException, branches: int, runs: int = 1) -> DaskFault:
    """Sort an exception a chunk's future raised.

    ``branches``: how many of its branches did not report; ``runs``: how often the task
    announced it started.  ``KilledWorker`` of a task that never ran (it sat queued on
    workers that other tasks killed) is the others' fault: back to the queue, uncharged.
    """
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        if branches > 1:
            return DaskFault.KILLED_CHUNK
        return DaskFault.KILLED_ALONE if runs else DaskFault.KILLED_QUEUED
    if isinstance(exc, (CancelledError, OSError, TimeoutError)) or type(exc).__name__ in _INFRASTRUCTURE_NAMES:
        return DaskFault.INFRASTRUCTURE
    return DaskFault.TASK_ERROR


def configured_wait() -> float:
    """Seconds a run waits for an unavailable cluster: Dask config ``durable-mp.cluster-wait``."""
    import dask

    return float(dask.config.get(CLUSTER_WAIT_KEY, DEFAULT_CLUSTER_WAIT))


def _scheduler_allowed_failures() -> int:
    import dask

    return int(dask.config.get("distributed.scheduler.allowed-failures"))


def _scheduler_processing_on(key: str, dask_scheduler: Any = None) -> str | None:
    task = dask_scheduler.tasks.get(key) if dask_scheduler is not None else None
    worker = getattr(task, "processing_on", None)
    return None if worker is None else str(worker.address)


def processing_on(client: Any, key: str) -> str | None:
    """The worker running task ``key`` (asked of the scheduler), or None."""
    try:
        address: str | None = client.run_on_scheduler(_scheduler_processing_on, key)
    except Exception:  # noqa: BLE001 - the scheduler went away: so did the task
        return None
    return address


def client_for(backend: Any) -> tuple[Any, bool]:
    """``(client, owned)`` for ``backend="dask"`` (new local cluster or $DASK_SCHEDULER_ADDRESS) or a Client."""
    from distributed import Client

    if isinstance(backend, Client):
        return backend, False
    return Client(), True


def restart_worker(client: Any, address: str, why: str) -> threading.Thread:
    """Restart the worker at ``address`` through its nanny, in the background: only a new process
    stops a thread that runs on (the local pool terminates its worker alike).

    Dask runs the worker's other tasks again elsewhere, as after any lost worker (durable_mp's
    tasks skip what their lost run finished).  A worker without a nanny is left alone, since
    Dask could only shut it down: its thread runs to its end, unobserved.
    """
    def restart() -> None:
        try:
            nanny = client.scheduler_info().get("workers", {}).get(address, {}).get("nanny")
            if not nanny:
                log.warning("%s, but its Dask worker %s has no nanny to restart it: its thread runs on, "
                            "unobserved, and holds that worker's thread until it ends", why, address)
                return
            log.warning("%s: restarting its Dask worker %s through its nanny", why, address)
            client.restart_workers([address], timeout=RESTART_SECONDS, raise_for_error=False)
        except Exception as exc:  # noqa: BLE001 - the scheduler went away meanwhile: so did the worker's tasks
            log.warning("could not restart Dask worker %s: %s: %s", address, type(exc).__name__, exc)

    thread = threading.Thread(target=restart, daemon=True, name="durable_mp-dask-restart")
    thread.start()
    return thread


def submit_payload(client: Any, token: str, payload: bytes) -> Any:
    """A batch's payload as a Dask task (Dask recomputes it when lost); chunks find its future through a
    Dask ``Variable`` (which also keeps it), not as a graph dependency that would tie them to its worker."""
    from distributed import Variable

    from durable_mp.backends.dask_tasks import load_payload, payload_variable

    future = client.submit(load_payload, payload, key=f"durable_mp-payload-{token}-{uuid.uuid4().hex[:8]}",
                           pure=False, priority=PAYLOAD_PRIORITY)
    Variable(payload_variable(token), client=client).set(future)
    return future


def drop_payload(client: Any, token: str, future: Any) -> None:
    from distributed import Variable

    from durable_mp.backends.dask_tasks import payload_variable

    future.release()
    try:
        Variable(payload_variable(token), client=client).delete()
    except Exception:  # noqa: BLE001 - the scheduler went away, and its variables with it
        pass
