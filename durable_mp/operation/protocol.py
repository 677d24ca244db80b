"""What an operation needs of the ``DurableContext`` it runs in.

Operations sit below ``context`` (DESIGN.md §6: ``operation ← context``): the context
calls them, so they cannot import it.  They see it through this protocol instead,
which ``context.DurableContext`` satisfies.  The leading-underscore members are the
context's replay machinery, shared with the operations and used nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from durable_mp.config import StepConfig
from durable_mp.core.records import OpRecord
from durable_mp.logger import Logger

T = TypeVar("T")


class DurableContextProtocol(Protocol):
    """The parts of a ``DurableContext`` that ``operation`` modules call."""

    state: Any  # engine's DriverState or WorkerContextState

    @property
    def logger(self) -> Logger: ...

    @property
    def record_parent(self) -> str: ...

    def _next_id(self) -> str: ...

    def _checkpoint(self, op_id: str, op_type: str, sub_type: str, name: str | None) -> OpRecord | None: ...

    def _replayed(self, rec: OpRecord, serdes: Any, what: str, error_cls: str) -> Any: ...

    def create_child_context(self, operation_id: str, *, is_virtual: bool = False) -> DurableContextProtocol: ...

    def create_callback(self, name: str | None = None, config: Any = None) -> Any: ...

    def step(self, func: Callable[..., T], name: str | None = None, config: StepConfig | None = None) -> T: ...


__all__ = ["DurableContextProtocol"]
