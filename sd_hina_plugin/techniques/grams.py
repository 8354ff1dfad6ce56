"""Grams (Cao et al., "Grams: Gradient Descent with Adaptive Momentum Scaling", arXiv 2412.17107):

    u <- |u| * sign(g)

The magnitude comes from the adaptive momentum, the direction from the current gradient.
"""

from __future__ import annotations

import torch

from ..engine.technique import Technique


class Grams(Technique):
    name = "grams"
    stage = "direction"
    summary = "u <- |u| sign(g)"

    def run(self, ctx) -> None:
        source = ctx.take_u_source()  # u = m pending (ADOPT): |m| straight into u, no copy first
        magnitude = ctx.u.abs_() if source is None else torch.abs(source, out=ctx.u_buffer)
        magnitude.mul_(torch.sign(ctx.g, out=ctx.temp()))
