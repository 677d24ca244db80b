"""The reference's payload encoding for ``durable-mp history``, kept out of ``inspect``.

``inspect`` reads only ``core`` and ``store`` (docs/architecture.md "Packages").  Turning a stored value into
the text the reference's history holds needs the serializers and ``BatchResult``; this
module lends them to ``inspect.history.build_history`` (the CLI and the test runner pass
``HistoryPayloads()``).
"""

from __future__ import annotations

from typing import Any

from durable_mp import serdes as _serdes
from durable_mp.concurrency.models import BatchItem, BatchItemStatus, BatchResult, CompletionReason
from durable_mp.lambda_service import ErrorObject


class HistoryPayloads:
    """``inspect.history.PayloadCodec`` with the reference's default serializer."""

    def __init__(self) -> None:
        self._extended: _serdes.ExtendedTypeSerDes[Any] = _serdes.ExtendedTypeSerDes()

    def value(self, data: bytes | str) -> Any:
        if isinstance(data, str):  # the default serdes' envelope (the reference's format)
            return self._extended.deserialize(data)
        return _serdes.unpickle(data)

    def encode(self, value: Any) -> str:
        return self._extended.serialize(value)

    def batch_result(self, items: list[tuple[int, str, Any, dict | None]], reason: str) -> Any:
        return BatchResult([BatchItem(index, BatchItemStatus(status), value,
                                      None if error is None else ErrorObject.from_dict(error))
                            for index, status, value, error in items], CompletionReason(reason))
