"""The docs' ``durable_mp.map`` pipeline (docs/map.md) runs as written, and a second run returns the stored result."""

from __future__ import annotations

import subprocess
import sys

import pytest
from util import doc_block

@pytest.mark.timeout(120)
def test_readme_pipeline_runs_and_a_rerun_returns_the_stored_result(tmp_path):
    (tmp_path / "pipeline.py").write_text(doc_block("# pipeline.py"))
    (tmp_path / "in").mkdir()
    texts = {f"doc{i}.txt": " ".join(["word"] * (i + 1)) for i in range(6)}
    for name, text in texts.items():
        (tmp_path / "in" / name).write_text(text)
    first = subprocess.run([sys.executable, "pipeline.py"], cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "21 words in 6 files"
    assert {p.name: p.read_text() for p in (tmp_path / "out").iterdir()} == {
        name: f"{i + 1}\n" for i, name in enumerate(texts)}
    second = subprocess.run([sys.executable, "pipeline.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=90)
    assert second.returncode == 0 and second.stdout.strip() == "21 words in 6 files", second.stderr
    assert "stored result" in second.stderr
