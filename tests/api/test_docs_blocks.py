"""Every ``python`` code block of the README and of ``docs/`` runs as written.

A block is run as a script in a fresh directory (its default store included).  A block
whose first line is ``# name.py`` is saved under that name; one whose first line says
``(exits N ...)`` must exit with N, every other block with 0.  Signatures and shell
transcripts are fenced as ``text``/``console``/``bash`` and are not run here (the
commands of the README's first block are what CI itself runs).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from util import DOC_FILES, REPO

ROOT = REPO
# Pages whose blocks a test of their own runs and checks the output of.
CHECKED_ELSEWHERE = {"map.md": "test_docs_map.py"}
DOCS = [p for p in DOC_FILES if p.name not in CHECKED_ELSEWHERE]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FILE_NAME = re.compile(r"^# ([\w.-]+\.py)\b")
EXIT_CODE = re.compile(r"\(exits (\d+)\b")


def python_blocks() -> list[tuple[str, str]]:
    """(id, source) of every python block, the id naming the file and the block's place."""
    blocks = []
    for doc in DOCS:
        for n, source in enumerate(FENCE.findall(doc.read_text(encoding="utf-8")), 1):
            blocks.append((f"{doc.relative_to(ROOT)}#{n}", source))
    return blocks


def test_the_docs_hold_python_blocks():
    """The collection below is not vacuous: the tours and topic pages carry runnable code."""
    ids = [block_id for block_id, _ in python_blocks()]
    assert any(i.startswith("README.md") for i in ids) and any(i.startswith("docs/") for i in ids)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("block_id,source", python_blocks(), ids=[i for i, _ in python_blocks()])
def test_a_docs_python_block_runs_as_written(block_id, source, tmp_path):
    first = source.splitlines()[0] if source else ""
    named = FILE_NAME.match(first)
    script = tmp_path / (named.group(1) if named else "block.py")
    script.write_text(source, encoding="utf-8")
    expected = int(m.group(1)) if (m := EXIT_CODE.search(first)) else 0
    done = subprocess.run([sys.executable, script.name], cwd=tmp_path, capture_output=True, text=True,
                          timeout=150)
    assert done.returncode == expected, f"{block_id} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
