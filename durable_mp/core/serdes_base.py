"""The serializer interface: ``SerDes``, ``SerDesContext`` and the payload type.

Every config names a ``SerDes`` (``StepConfig.serdes``, ``MapConfig.item_serdes``, ...),
while the implementations in ``serdes`` need ``BatchResult``, whose policy reads
``config.CompletionConfig``.  The interface lives here, below both, and ``serdes``
re-exports it: users import it from ``durable_mp.serdes`` as in the reference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

Payload = str | bytes


@dataclass(frozen=True)
class SerDesContext:
    """Which operation a value belongs to, for serializers that store it elsewhere."""

    operation_id: str = ""
    durable_execution_arn: str = ""


class SerDes(ABC, Generic[T]):
    """Turns a value into a checkpoint payload and back."""

    @abstractmethod
    def serialize(self, value: T, serdes_context: SerDesContext) -> Payload: ...

    @abstractmethod
    def deserialize(self, data: Payload, serdes_context: SerDesContext) -> T: ...

    @staticmethod
    def is_primitive(obj: Any) -> bool:
        """True for JSON scalars and (nested) lists of them."""
        if obj is None or isinstance(obj, str | int | float | bool):
            return True
        return isinstance(obj, list) and all(SerDes.is_primitive(item) for item in obj)


__all__ = ["Payload", "SerDes", "SerDesContext"]
