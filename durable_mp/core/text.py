"""The text of a user object that may refuse to be printed.

An error message is built from user objects (an exception's ``str()``, the error a
serializer raised), in a worker or on the driver.  When the user's ``__str__`` raises,
building the message must not raise in turn: a worker thread that dies recording a
failure leaves its batch waiting forever, and a worker process that dies is charged as
a crash.  Such text says what could not be had, and why.
"""

from __future__ import annotations

from typing import Any


def type_name(obj: Any) -> str:
    """``module.QualName`` of ``obj``'s type (``builtins.`` included, so it is never ambiguous)."""
    cls = type(obj)
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls.__name__)}"


def safe_str(obj: Any) -> str:
    """``str(obj)``, or a note naming the type and what its ``__str__`` raised: never raises."""
    try:
        text = str(obj)
    except Exception as error:  # noqa: BLE001 - any failure of user code becomes text
        return f"<{type_name(obj)} object: str() raised {type(error).__name__}>"
    # a str subclass returned by ``__str__`` would travel (and pickle) as the user's class
    return text if text.__class__ is str else str.__getitem__(text, slice(None))


__all__ = ["safe_str", "type_name"]
