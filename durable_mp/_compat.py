"""Python 3.10 support: ``enum.StrEnum`` arrived in 3.11."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10
    from enum import Enum

    class StrEnum(str, Enum):
        """Members are strings; ``str(member)`` is the value, as in 3.11."""

        def __str__(self) -> str:
            return str(self.value)


__all__ = ["StrEnum"]
