"""Every python block of ``docs/map.md`` runs as written, twice (the second run reuses the first's results)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import durable_mp
from util import REPO

DOC = REPO / "docs" / "map.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
EXPECTED = {
    "first_map.py": "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]",
    "words.py": ("15 words\n18 words", "18 words\n18 words"),  # the second run starts with doc5.txt there
    "lookup.py": "no price for 'kiwi' at item 1\n[3, KeyError('kiwi'), 4]",
    "on_dask.py": "[0, 1, 8, 27, 64]\n[0, 1, 8, 27, 64]",
}


def test_every_block_is_checked():
    assert sorted(block.splitlines()[0][2:] for block in BLOCKS) == sorted(EXPECTED)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("block", BLOCKS, ids=[b.splitlines()[0][2:] for b in BLOCKS])
def test_doc_block_runs(block, tmp_path):
    name = block.splitlines()[0][2:]
    (tmp_path / name).write_text(block)
    env = {**os.environ, "PYTHONPATH": str(Path(durable_mp.__file__).parent.parent)}
    for run in range(2):
        done = subprocess.run([sys.executable, name], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env=env)
        assert done.returncode == 0, done.stderr
        expected = EXPECTED[name] if isinstance(EXPECTED[name], str) else EXPECTED[name][run]
        assert done.stdout.strip() == expected, (run, done.stdout, done.stderr)
    assert "nothing ran" in done.stderr or "already" in done.stderr, done.stderr
