"""What the user-facing pages state, checked against the code and the benchmark tables they quote."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import toml
import torch
from torch import nn

from sd_hina_plugin import registry

ROOT = Path(__file__).resolve().parents[1]


def _tag_rows() -> list[tuple[re.Pattern, str, str]]:
    """(pattern, tag, text) per row of docs/kohya.md's "Logged tags" table."""
    text = (ROOT / "docs" / "kohya.md").read_text()
    table = text[text.index("**Logged tags**"):].split("\n\n")[1]
    rows = []
    for line in table.splitlines()[2:]:
        tag, when = re.match(r"\| `([^`]+)` \| (.*) \|$", line).groups()
        parts = re.split(r"(<[^>]+>|\{[^}]+\})", tag)
        regex = "".join("[^/]+" if p.startswith("<") else "(" + "|".join(map(re.escape, p[1:-1].split(","))) + ")"
                        if p.startswith("{") else re.escape(p) for p in parts)
        rows.append((re.compile(regex + "$"), tag, when))
    return rows


class _LoRA(nn.Module):
    def __init__(self):
        super().__init__()
        self.lora_down = nn.Linear(32, 4, bias=False)
        self.lora_up = nn.Linear(4, 32, bias=False)

    def forward(self, x):
        return x + self.lora_up(self.lora_down(x))


@pytest.mark.parametrize("name", [s.name for s in registry.specs()])
def test_kohya_tag_table_lists_what_each_optimizer_logs(name):
    """Every key of stats() after two steps has a row, and a row that names optimizers names this one."""
    spec = registry.resolve(name)
    torch.manual_seed(0)
    model = nn.Sequential(_LoRA(), _LoRA())
    dtype = spec.cls.PARAM_DTYPES[0] if spec.cls.PARAM_DTYPES else torch.float32
    model.to(dtype)
    opt = spec.cls(model.named_parameters(), lr=1e-3)
    keys = set()
    for _ in range(2):
        opt.zero_grad()
        loss = model(torch.randn(8, 32, dtype=dtype)).float().pow(2).mean()
        loss.backward()
        opt.step()
        if hasattr(opt, "observe_loss"):
            opt.observe_loss(loss.detach())
        keys |= set(opt.stats())
    names = [s.name for s in registry.specs()]
    rows = _tag_rows()
    for key in sorted(keys):
        matches = [(tag, when) for pattern, tag, when in rows if pattern.match(key)]
        assert matches, f"{name} logs {key}, which docs/kohya.md's tag table does not list"
        tag, when = matches[0]
        named = [n for n in names if re.search(rf"(?<!\w){n}(?!\w)", when)]
        assert not named or name in named, f"{name} logs {key}, but the row for {tag} names only {named}"


def test_readme_names_the_bench_extra_for_plots():
    extras = toml.load(ROOT / "pyproject.toml")["project"]["optional-dependencies"]
    assert any(dep.startswith("matplotlib") for dep in extras["bench"])
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[bench]"' in readme and "no plots" in readme


def test_readme_states_sinkgd_at_3x_as_the_benchmark_table_does():
    """README's sentence on Automagic_Sinkgd at 3x AdamW's lr quotes docs/benchmarks.md's per-seed table."""
    bench = (ROOT / "docs" / "benchmarks.md").read_text()
    row = re.search(r"\| `Automagic_Sinkgd`, 0\.027 \| ([^|]+) \|", bench).group(1)
    ratios = [float(v) for v in row.split()]
    diverged = [r for r in ratios if r > 10]
    rest = [r for r in ratios if r <= 10]
    words = dict(enumerate(["no", "one", "two", "three", "four", "five", "six", "seven", "eight"]))
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert all(r > 1 for r in ratios) and f"worse than tuned AdamW on all {words[len(ratios)]} seeds" in readme
    assert f"{min(rest):.2f}-{max(rest):.2f}x its loss on {words[len(rest)]}" in readme
    assert f"{words[len(diverged)]} diverged, at {diverged[0]:g}x" in readme
