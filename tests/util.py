"""Helpers shared by the test modules."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def doc_block(first_line: str) -> str:
    """The fenced python block of the README or ``docs/`` whose source starts with ``first_line``."""
    for doc in DOC_FILES:
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S):
            if block.startswith(first_line):
                return block
    raise AssertionError(f"no python block of README.md or docs/ starts with {first_line!r}")
