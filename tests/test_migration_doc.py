"""docs/migration.md: its Python blocks, run in order as one script (the page promises it)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "migration.md"


def test_migration_page_snippets_run(capsys, caplog):
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "migration_doc"}
    with caplog.at_level(logging.WARNING):
        for i, block in enumerate(blocks):
            exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "AdamW_HinaAdaptive" in out and "lr range: " in out and "hina/lr/" in out
    # a warning the page's code prints is one the page tells the reader about (its gist: up to the first comma)
    flat = " ".join(text.split())
    for record in caplog.records:
        if record.levelno >= logging.WARNING:
            gist = record.getMessage().split(": ", 1)[-1].split(",")[0]
            assert gist in flat, f"docs/migration.md does not mention the warning it prints: {record.getMessage()}"
