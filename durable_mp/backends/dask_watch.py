"""Whether the Dask cluster can run anything now, and the wait while it cannot.

``ClusterWatch`` holds the driver's ``distributed.Client``: it counts the workers' threads
(asked of the scheduler at most every ``THREADS_REFRESH_SECONDS``), reads how many worker
deaths a task survives, and while there is no scheduler or no worker it waits, with a
message, up to the Dask config value ``durable-mp.cluster-wait``; past that it raises
``ClusterUnavailableError`` (the execution stays RUNNING and resumable).  A client that
gave up reconnecting is replaced by a new one to the same address, within that wait.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from durable_mp.backends.dask_cluster import (
    CLUSTER_WAIT_KEY,
    DASK_DEFAULT_ALLOWED_FAILURES,
    _scheduler_allowed_failures,
    configured_wait,
)
from durable_mp.exceptions import ClusterUnavailableError

log = logging.getLogger("durable_mp.dask")

STALL_POLL_SECONDS = 1.0
THREADS_REFRESH_SECONDS = 5.0  # the workers' thread count is asked of the scheduler at most this often


class ClusterWatch:
    """The client, and the cluster's ability to run tasks as the driver sees it.

    ``on_client(client)`` is told of a new client (after a reconnect); ``on_stall()`` of
    every wait (the scheduler may be a new one: event subscriptions must be made again).
    """

    def __init__(self, client: Any, execution_id: str, *, cluster_wait: float | None = None,
                 reconnect: Callable[[str], Any] | None = None, on_client: Callable[[Any], None],
                 on_stall: Callable[[], None]) -> None:
        self.client = client
        self.execution_id = execution_id
        self.reconnect = reconnect  # a new client to the scheduler's address, once this one gave up
        self.address: str = getattr(getattr(client, "scheduler", None), "address", None) or ""
        self.cluster_wait = cluster_wait if cluster_wait is not None else configured_wait()
        self.on_client = on_client
        self.on_stall = on_stall
        self.nthreads = 0
        self.nthreads_at = -THREADS_REFRESH_SECONDS
        self.allowed: int | None = None
        self.stalled_since: float | None = None  # since when the cluster could not run anything
        self.stall_reason = ""

    def threads(self, refresh: bool = False) -> int:
        """Threads of the cluster's workers, asked of the scheduler at most every few seconds (0: none, or away)."""
        now = time.monotonic()
        if refresh or now - self.nthreads_at >= THREADS_REFRESH_SECONDS:
            self.nthreads_at = now
            try:
                self.nthreads = sum(self.client.nthreads().values()) if self.connected() else 0
            except Exception:  # noqa: BLE001 - the scheduler went away meanwhile
                self.nthreads = 0
        return self.nthreads

    def connected(self) -> bool:
        return getattr(self.client, "status", "running") == "running"

    def allowed_failures(self) -> int:
        """How many worker deaths a task survives on this cluster (the scheduler's setting, read once)."""
        if self.allowed is None:
            try:
                self.allowed = int(self.client.run_on_scheduler(_scheduler_allowed_failures))
            except Exception:  # noqa: BLE001 - the scheduler's own config is unreadable: Dask's default
                self.allowed = DASK_DEFAULT_ALLOWED_FAILURES
        return self.allowed

    def check(self) -> None:
        """Nothing finished for a while: is the cluster still able to run the tasks?"""
        if not self.connected():
            self.unavailable("the Dask client lost its scheduler")
        elif not self.threads(refresh=True):
            self.unavailable("the Dask cluster has no workers")
        else:
            self.available()

    def unavailable(self, reason: str) -> None:
        """The cluster cannot run anything now: wait for it, up to ``cluster_wait`` seconds, then stop resumable."""
        now = time.monotonic()
        if self.stalled_since is None or reason != self.stall_reason:
            if self.stalled_since is None:
                self.stalled_since = now
            self.stall_reason = reason
            log.warning("%s; waiting up to %gs for it (Dask config %r), then the run stops, resumable",
                        reason, self.cluster_wait, CLUSTER_WAIT_KEY)
        self.on_stall()
        if now - self.stalled_since > self.cluster_wait:
            raise ClusterUnavailableError(
                f"{reason} for {now - self.stalled_since:.0f}s (limit {self.cluster_wait:g}s, Dask config "
                f"{CLUSTER_WAIT_KEY!r}); execution {self.execution_id!r} stays RUNNING: run it again to resume it")
        time.sleep(STALL_POLL_SECONDS)
        if getattr(self.client, "status", "running") in ("closed", "closing"):
            self._reconnect()

    def _reconnect(self) -> None:
        """The client gave up reconnecting (``distributed.comm.timeouts.connect``): try a new one, within our wait."""
        if self.reconnect is None or not self.address:
            raise ClusterUnavailableError(
                f"the Dask client gave up reconnecting to the scheduler (distributed.comm.timeouts.connect) and "
                f"cannot be replaced; execution {self.execution_id!r} stays RUNNING: run it again to resume it")
        try:
            client = self.reconnect(self.address)
        except (OSError, TimeoutError) as exc:
            log.debug("no scheduler at %s yet: %s", self.address, exc)
            return
        log.warning("connected a new Dask client to %s (the old one gave up reconnecting)", self.address)
        self.client = client
        self.on_client(client)

    def available(self) -> None:
        if self.stalled_since is not None:
            log.warning("the Dask cluster is back after %.0fs", time.monotonic() - self.stalled_since)
        self.stalled_since = None
