"""Torque-Aware Momentum (Malviya et al., arXiv 2412.18790), inside the momentum.

Per tensor, with x the momentum's input (the gradient, or ADOPT's normalized gradient):

    c = cos(m_{t-1}, x)   (1 when m is still zero: no torque information yet)
    s <- gamma s + (1 - gamma) c          s_hat = s / w,  w <- gamma w + (1 - gamma)
    d = (1 + s_hat) / 2                   x <- d * x   (then m <- b1 m + (1 - b1) x)

Gradients that turn against the running momentum enter it damped. ``gamma`` is ``tam_beta``. Deviation,
on purpose: ``s`` is bias-corrected like Adam's moments (``w`` is the accumulated weight, per tensor), so d
is not stuck near 1/2 for the first ~1/(1 - gamma) steps as with an uncorrected EMA started at zero.
"""

from __future__ import annotations

import torch

from ..config import Field
from ..engine.technique import Slot, Technique


class TorqueAwareMomentum(Technique):
    name = "tam"
    stage = "moments"
    slots = (Slot("tam.s", per_tensor=True), Slot("tam.w", per_tensor=True))
    summary = "TAM: the momentum's input weighted by (1 + EMA of cos(m, g)) / 2 per tensor"

    def __init__(self, beta: Field, switch: Field | None = None):
        self.beta = beta
        self.fields = (beta,)
        super().__init__(switch)

    def run(self, ctx) -> None:
        x = ctx.m_in
        d = torque_weights(ctx, ctx.state("exp_avg"), x, ctx.hp[self.beta.name])
        if x is ctx.g:
            x = ctx.moment_input().copy_(x)
        ctx.m_in = ctx.tensor_scale_(x, d)


def torque_weights(ctx, m: torch.Tensor, x: torch.Tensor, gamma: float) -> torch.Tensor:
    """TAM's per-tensor weight ``d = (1 + s_hat) / 2`` of the momentum input ``x`` (updates ``tam.s``/``tam.w``)."""
    m_norm, x_norm, dot = ctx.tensor_reductions(("norm", m), ("norm", x), ("dot", m, x))
    norms = m_norm * x_norm
    cos = torch.where(norms > 0, dot / norms.clamp_min(1e-30), torch.ones_like(norms))
    s, w = ctx.state("tam.s"), ctx.state("tam.w")
    s.lerp_(cos, 1.0 - gamma)
    w.mul_(gamma).add_(1.0 - gamma)
    return (s / w).add_(1.0).mul_(0.5)
