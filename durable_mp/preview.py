"""Compact previews of checkpointed values, as the reference's ``preview`` module offers.

A serializer that stores a value elsewhere (``filesystem_serdes``) can keep a small,
readable part of it inline: the fields a person needs to recognise the value, some of
them masked.  ``build_preview`` picks those fields from nested dicts by name or path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["FieldMatchMode", "PreviewConfig", "PreviewField", "PreviewMode", "build_preview"]

DEFAULT_MAX_PREVIEW_BYTES = 4096  # JSON size of one preview, as in the reference


class PreviewMode(str, Enum):
    """INCLUDE_ALL keeps every field but the excluded; EXCLUDE_ALL keeps only the included."""

    INCLUDE_ALL = "INCLUDE_ALL"
    EXCLUDE_ALL = "EXCLUDE_ALL"


class FieldMatchMode(str, Enum):
    """ANYWHERE matches a field name at any depth; PATH matches a dotted path from the root."""

    ANYWHERE = "ANYWHERE"
    PATH = "PATH"


@dataclass(frozen=True)
class PreviewField:
    name: str
    match: FieldMatchMode = FieldMatchMode.ANYWHERE


@dataclass(frozen=True)
class PreviewConfig:
    mode: PreviewMode
    include: list[PreviewField] = field(default_factory=list)
    exclude: list[PreviewField] = field(default_factory=list)
    mask: list[PreviewField] = field(default_factory=list)
    mask_string: str = "***"
    max_preview_bytes: int = DEFAULT_MAX_PREVIEW_BYTES


def _matches(path: str, fields: list[PreviewField]) -> bool:
    leaf = path.rsplit(".", 1)[-1]
    return any((f.name == path) if f.match is FieldMatchMode.PATH else (f.name in (leaf, path)) for f in fields)


def build_preview(value: Any, config: PreviewConfig) -> dict[str, Any] | None:
    """The fields of ``value`` (a dict, nested dicts walked) that ``config`` shows, or None.

    Exclusion wins over masking; fields are added in order until the preview would pass
    ``config.max_preview_bytes`` as JSON.
    """
    if not isinstance(value, dict):
        return None
    preview: dict[str, Any] = {}
    size = 2  # "{}"

    def visible(path: str) -> bool:
        if _matches(path, config.exclude):
            return False
        if config.mode is PreviewMode.INCLUDE_ALL:
            return True
        return _matches(path, config.include) or _matches(path, config.mask)

    def walk(obj: dict[str, Any], prefix: str) -> None:
        nonlocal size
        for key, item in obj.items():
            path = f"{prefix}{key}"
            if isinstance(item, dict) and not visible(path):
                walk(item, f"{path}.")  # an included field may sit deeper
                continue
            if not visible(path):
                continue
            shown = config.mask_string if _matches(path, config.mask) else item
            try:
                cost = len(json.dumps({path: shown}, default=str)) - 1
            except (TypeError, ValueError):
                continue
            if size + cost > config.max_preview_bytes:
                return
            preview[path] = shown
            size += cost

    walk(value, "")
    return preview or None
