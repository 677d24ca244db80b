"""``context.logger``: a standard ``logging`` logger that stays quiet while replaying.

Replayed operations return checkpoints instead of running user code, so log lines from
the handler body would otherwise be printed again on every resume.  Every record carries
the operation's identity (``executionArn``, ``parentId``, ``operationName``,
``operationId``, ``attempt``) as ``extra``, as in the reference SDK.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

LOGGER_NAME = "durable_mp"


class Logger:
    """Logger of one durable context (or one step attempt)."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        extra: Mapping[str, Any] | None = None,
        is_replaying: Callable[[], bool] | None = None,
    ) -> None:
        self._logger = logger or logging.getLogger(LOGGER_NAME)
        self._extra = dict(extra or {})
        self._is_replaying = is_replaying

    def with_extra(self, **extra: Any) -> Logger:
        return Logger(self._logger, {**self._extra, **extra}, self._is_replaying)

    def set_logger(self, new_logger: logging.Logger) -> None:
        self._logger = new_logger

    @property
    def extra(self) -> dict:
        return dict(self._extra)

    def _log(self, level: int, msg: Any, args: tuple, extra: Mapping[str, Any] | None, exc_info: bool = False) -> None:
        if self._is_replaying is not None and self._is_replaying():
            return
        if not self._logger.isEnabledFor(level):
            return
        merged = {**self._extra, **(extra or {})}
        self._logger.log(level, msg, *args, extra=merged, exc_info=exc_info, stacklevel=3)

    def debug(self, msg: Any, *args: Any, extra: Mapping[str, Any] | None = None) -> None:
        self._log(logging.DEBUG, msg, args, extra)

    def info(self, msg: Any, *args: Any, extra: Mapping[str, Any] | None = None) -> None:
        self._log(logging.INFO, msg, args, extra)

    def warning(self, msg: Any, *args: Any, extra: Mapping[str, Any] | None = None) -> None:
        self._log(logging.WARNING, msg, args, extra)

    def error(self, msg: Any, *args: Any, extra: Mapping[str, Any] | None = None) -> None:
        self._log(logging.ERROR, msg, args, extra)

    def exception(self, msg: Any, *args: Any, extra: Mapping[str, Any] | None = None) -> None:
        self._log(logging.ERROR, msg, args, extra, exc_info=True)
