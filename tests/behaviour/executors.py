"""The executors a behaviour suite runs under: a local pool per start method, or a Dask cluster.

``Refused`` lists what durable_mp documents as refused on Dask (docs/dask.md,
``durable_mp/backends/dask.py``): a behaviour that needs one asserts the refusal there.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from enum import Enum
from typing import Any

from durable_mp.engine.start import START_METHODS

LOCAL = [m for m in START_METHODS if m in multiprocessing.get_all_start_methods()]
EXECUTORS = [*LOCAL, "dask"]
WORKERS = 2


class Refused(Enum):
    """Features a behaviour may need, and whether an executor refuses them (``Executor.refuses``)."""

    AT_MOST_ONCE_IN_BRANCH = "AT_MOST_ONCE_PER_RETRY steps inside branches"
    CALLBACK_IN_BRANCH = "callbacks inside branches"
    MAX_WORKER_MEMORY = "max_worker_memory"


# What durable_mp documents as refused on Dask (docs/dask.md): AT_MOST_ONCE steps, callbacks and
# step timeouts inside branches work there since records stream from the Dask workers.
DASK_REFUSES = frozenset({Refused.MAX_WORKER_MEMORY})


@dataclass
class Executor:
    """Where branches run: a local pool started by ``name``, or the Dask cluster behind ``client``."""

    name: str
    cluster: Any = None  # tests/dask_cluster.RealCluster
    client: Any = None  # distributed.Client

    @property
    def dask(self) -> bool:
        return self.client is not None

    def refuses(self, what: Refused) -> bool:
        return self.dask and what in DASK_REFUSES  # every documented refusal is Dask's

    def options(self) -> dict[str, Any]:
        """``handler.run`` keywords choosing this executor."""
        if self.dask:
            return {"backend": self.client}
        return {"start_method": self.name, "max_workers": WORKERS}

    def run(self, handler: Any, event: Any = None, *, store: str, **kw: Any) -> Any:
        return handler.run(event, store=store, **self.options(), **kw)

    def workers_back(self) -> None:
        """After a test killed workers: on Dask, wait until the nannies restarted both."""
        if self.dask:
            self.client.wait_for_workers(WORKERS, timeout=60)


