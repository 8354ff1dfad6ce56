"""OrthoGrad / ⊥Grad (Prieto et al., "Grokking at the Edge of Numerical Stability", arXiv 2501.04697).

Applied to the raw gradient before the base optimizer, per tensor:

    g_perp = g - (<w, g> / (<w, w> + eps)) w          g <- g_perp * ||g|| / (||g_perp|| + eps)

The projection removes the component that only scales the weights; the rescale keeps the gradient norm.
Single-element tensors are left alone: their gradient is always parallel to the weight and would vanish.
"""

from __future__ import annotations

import torch

from ..config import Field
from ..engine.technique import Technique

EPS = 1e-30


class OrthoGrad(Technique):
    name = "orthograd"
    stage = "grad"
    summary = "project the gradient orthogonal to the weights, rescaled to the original norm (per tensor)"

    #: phases in which it runs, with t the group's step and W its warmup_steps
    PHASES = {"always": lambda t, w: True,
              "after_warmup": lambda t, w: t > w,      # Automagic_Sinkgd
              "first_half": lambda t, w: t < w / 2}    # the Automagic_CameAMP family

    def __init__(self, switch: Field | None = None, phase: str = "always"):
        super().__init__(switch)
        self.active = self.PHASES[phase]

    def run(self, ctx) -> None:
        if not self.active(ctx.step, ctx.hp.get("warmup_steps", 0)):
            return
        g = ctx.g
        w = ctx.params32()
        # (a norm reads w once: faster than a dot with itself)
        wg, ww, norm_before = ctx.tensor_reductions(("dot", w, g), ("norm", w), ("norm", g))
        coef = torch.where(ctx.numels() > 1, wg / (ww.square_() + EPS), 0.0)
        ctx.tensor_axpy_(g, w, -coef)                     # g - coef w, one pass
        # the norm after is measured, not derived from the dots: when g is nearly parallel to w the derived
        # value cancels to ~0 while the computed g_perp keeps rounding noise, and the rescale would blow it up
        ctx.tensor_scale_(g, norm_before / (ctx.tensor_norm(g) + EPS))
