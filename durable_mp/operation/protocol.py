"""What an operation needs of the ``DurableContext`` it runs in.

Operations sit below ``context`` (docs/architecture.md "Packages": ``operation ←
context``): the context calls them, so they cannot import it.  They see it through this
protocol instead, which ``context.DurableContext`` satisfies.  ``_next_id`` is the
context's operation counter, shared with the operations and used nowhere else; what the
store holds for an operation is asked through ``operation.replay``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from durable_mp.config import StepConfig
from durable_mp.engine.state import ContextState
from durable_mp.logger import Logger

T = TypeVar("T")


class DurableContextProtocol(Protocol):
    """The parts of a ``DurableContext`` that ``operation`` modules call."""

    @property
    def state(self) -> ContextState: ...  # the engine's DriverState or WorkerContextState

    @property
    def logger(self) -> Logger: ...

    @property
    def record_parent(self) -> str: ...

    def _next_id(self) -> str: ...

    def create_child_context(self, operation_id: str, *, is_virtual: bool = False) -> DurableContextProtocol: ...

    def create_callback(self, name: str | None = None, config: Any = None) -> Any: ...

    def step(self, func: Callable[..., T], name: str | None = None, config: StepConfig | None = None) -> T: ...


__all__ = ["DurableContextProtocol"]
