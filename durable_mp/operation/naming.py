"""The name an operation is recorded under, shared by ``context`` and the operations."""

from __future__ import annotations

from typing import Any


def op_name(func: Any, name: str | None) -> str | None:
    """Explicit name, else a decorator's original name, else the function's ``__name__``.

    The reference stops at the decorator name; durable_mp also uses ``__name__`` (but not
    ``<lambda>``) so that history and errors say which step it was.
    """
    if name is not None:
        return name
    original = getattr(func, "_original_name", None)
    if original:
        return original
    fname = getattr(func, "__name__", None)
    return fname if fname and fname != "<lambda>" else None


__all__ = ["op_name"]
