"""docs/migration.md: its Python blocks, run in order as one script (the page promises it)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "migration.md"


def test_migration_page_snippets_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "migration_doc"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "AdamW_HinaAdaptive" in out and "lr range: " in out and "hina/lr/" in out
