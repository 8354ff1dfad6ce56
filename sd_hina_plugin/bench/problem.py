"""What a benchmark task hands the runner, and the character encoding of the text tasks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class Problem:
    named: list[tuple[str, nn.Parameter]]
    loss: Callable[[int], torch.Tensor]
    heldout: Callable[[], float]
    #: every parameter of the problem (frozen base included), for casting to bf16
    modules: tuple[nn.Module, ...] = ()

    def cast(self, dtype: torch.dtype) -> "Problem":
        """All weights to ``dtype`` (for optimizers that take bf16 weights only); losses stay fp32."""
        for module in self.modules:
            module.to(dtype)
        for _, p in self.named:
            p.data = p.data.to(dtype)
        return self


VOCAB = 96  # printable ASCII and newline


def printable(text: str) -> str:
    """``text`` with every character outside printable ASCII and newline replaced by a space."""
    return "".join(c if 32 <= ord(c) < 127 or c == "\n" else " " for c in text)


def encode(text: str) -> torch.Tensor:
    return torch.tensor([95 if c == "\n" else ord(c) - 32 for c in text])
