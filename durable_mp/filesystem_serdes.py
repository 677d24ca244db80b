"""A serializer that keeps step results in files, as the reference's ``filesystem_serdes``.

The checkpoint holds a small JSON envelope: ``{"file": path}`` (plus an optional
``"preview"``) when the value went to a file under ``mount_path``, ``{"data": json}``
when it stayed inline.  durable_mp has no 256 KB checkpoint limit, so OVERFLOW mode
only matters for code that shares files with the reference; it uses the same threshold.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from durable_mp.core.serdes_base import SerDes, SerDesContext
from durable_mp.serdes import EXTENDED_TYPES_SERDES

__all__ = ["FileSystemPathEncoding", "FileSystemSerDes", "FileSystemSerDesConfig", "FileSystemSerDesMode"]

CHECKPOINT_LIMIT_BYTES = 256 * 1024  # the reference's checkpoint size limit
OVERFLOW_THRESHOLD_BYTES = CHECKPOINT_LIMIT_BYTES - 1024  # room for the envelope around inline data


class FileSystemSerDesMode(str, Enum):
    """ALWAYS writes every value to a file; OVERFLOW only those too large to stay inline."""

    ALWAYS = "ALWAYS"
    OVERFLOW = "OVERFLOW"


class FileSystemPathEncoding(str, Enum):
    """How execution and operation ids become path segments."""

    URI = "URI"
    NONE = "NONE"


@dataclass(frozen=True)
class FileSystemSerDesConfig:
    storage_mode: FileSystemSerDesMode = FileSystemSerDesMode.ALWAYS
    path_encoding: FileSystemPathEncoding = FileSystemPathEncoding.URI
    generate_preview: Callable[[Any], dict[str, Any] | None] | None = None
    serdes: SerDes[Any] = EXTENDED_TYPES_SERDES


def _segment(text: str, encoding: FileSystemPathEncoding) -> str:
    return urllib.parse.quote(text, safe="") if encoding is FileSystemPathEncoding.URI else text


class FileSystemSerDes(SerDes[Any]):
    """Values in ``mount_path/<execution>/<operation>.json``, an envelope in the checkpoint."""

    def __init__(self, mount_path: str, config: FileSystemSerDesConfig | None = None) -> None:
        self.mount_path = mount_path
        self.config = config or FileSystemSerDesConfig()

    def _write(self, text: str, ctx: SerDesContext) -> str:
        encoding = self.config.path_encoding
        directory = os.path.join(self.mount_path, _segment(ctx.durable_execution_arn or "execution", encoding))
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{_segment(ctx.operation_id or 'operation', encoding)}.json")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)  # a reader never sees half a file
        return path

    def serialize(self, value: Any, serdes_context: SerDesContext | None = None) -> str:
        ctx = serdes_context or SerDesContext()
        payload = self.config.serdes.serialize(value, ctx)
        text = payload if isinstance(payload, str) else payload.decode()  # files hold text
        if self.config.storage_mode is FileSystemSerDesMode.OVERFLOW and len(text.encode()) <= OVERFLOW_THRESHOLD_BYTES:
            return json.dumps({"data": text})
        envelope: dict[str, Any] = {"file": self._write(text, ctx)}
        if self.config.generate_preview is not None:
            preview = self.config.generate_preview(value)
            if preview is not None:
                envelope["preview"] = preview
        return json.dumps(envelope, default=str)

    def deserialize(self, data: Any, serdes_context: SerDesContext | None = None) -> Any:
        ctx = serdes_context or SerDesContext()
        envelope = json.loads(data)
        if "data" in envelope:
            return self.config.serdes.deserialize(envelope["data"], ctx)
        with open(envelope["file"], encoding="utf-8") as src:
            return self.config.serdes.deserialize(src.read(), ctx)
