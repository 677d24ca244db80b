"""On a Dask worker: ``ctx.logger`` lines of branches go to the driver as Dask events.

The driver (``dask_stream.WorkerStream``) re-emits them in its own log; other loggers'
records stay in the worker's log.
"""

from __future__ import annotations

import logging
import threading

from durable_mp.engine.worker_process import record_data
from durable_mp.logger import LOGGER_NAME

__all__ = ["CURRENT", "forward_logs", "log_topic"]


def log_topic(execution_id: str) -> str:
    """The Dask event topic that carries an execution's ``ctx.logger`` records from the workers."""
    return f"durable_mp-log-{execution_id}"


class _EventLogHandler(logging.Handler):
    """On a Dask worker: sends ``ctx.logger`` records to the driver as Dask events (``log_event``).

    A record names its execution (``executionArn``, as ``ctx.logger`` adds to every record);
    records without one are not durable_mp's and stay in the worker's own log.
    """

    def emit(self, record: logging.LogRecord) -> None:
        execution = getattr(record, "executionArn", None)
        if not execution:
            return
        try:
            from distributed import get_worker

            get_worker().log_event(log_topic(execution), record_data(record, getattr(CURRENT, "index", None)))
        except Exception:  # noqa: BLE001 - logging must never break a branch
            pass


CURRENT = threading.local()  # the branch a Dask thread runs (its log records name it)
_HANDLER_LOCK = threading.Lock()


def forward_logs(level: int) -> None:
    """Install the event handler on this worker's ``durable_mp`` logger once; log at the driver's level."""
    logger = logging.getLogger(LOGGER_NAME)
    with _HANDLER_LOCK:
        if not any(isinstance(h, _EventLogHandler) for h in logger.handlers):
            logger.addHandler(_EventLogHandler())
        logger.setLevel(level)
