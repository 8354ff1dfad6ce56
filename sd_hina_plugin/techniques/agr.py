"""Adaptive Gradient Regularization (Jiang et al., arXiv 2407.16944), per tensor:

    alpha = |g| / sum(|g|)          g <- g - alpha * g = g * (1 - |g| / sum(|g|))

The sum runs over the elements of each tensor (the paper's per-layer coefficient), not over the whole
parameter group (where it would be ~1/N and a no-op). Single-element tensors (e.g. LyCORIS ``scalar``) are
left alone: for them alpha is 1 and the formula would erase every gradient.
"""

from __future__ import annotations

import torch

from ..engine.technique import Technique


class AGR(Technique):
    name = "agr"
    stage = "grad"
    summary = "g <- g (1 - |g| / sum|g|) per tensor"

    def run(self, ctx) -> None:
        g = ctx.g
        alpha = torch.abs(g, out=ctx.temp())
        inverse = torch.where(ctx.numels() > 1, 1.0 / ctx.tensor_sum(alpha).clamp_min_(1e-30), 0.0)
        ctx.tensor_scale_(alpha, inverse)
        g.addcmul_(g, alpha, value=-1.0)
