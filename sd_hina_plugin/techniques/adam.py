"""Adam's moments and normalization (Kingma & Ba, arXiv 1412.6980; decoupled decay: Loshchilov & Hutter, 1711.05101).

With ``t`` the group step, ``g`` the gradient:

    m <- b1 m + (1 - b1) x              (x = ctx.m_in: the gradient, or what ADOPT / TAM made of it)
    v <- b2 v + (1 - b2) g^2
    u  = m / (sqrt(v) / sqrt(1 - b2^t) + eps),   applied with lr / (1 - b1^t)

This is the arithmetic of ``torch.optim.AdamW`` and of bitsandbytes' 8-bit AdamW (which runs it between a
blockwise dequantize and requantize of m and v).
"""

from __future__ import annotations

import math

import torch

from ..config import Field
from ..engine.technique import Slot, Technique

BETAS = Field("betas", "floats", (0.9, 0.999), "Adam's decay rates (b1, b2) of the first and second moment.",
              low=0.0, high=1.0, high_open=True, length=2)
EPS = Field("eps", "float", 1e-8, "Added to the root of the second moment (Adam's epsilon).", low=0.0, high=1.0)
EXP_AVG = Slot("exp_avg", quantizable=True, signed=True)
EXP_AVG_SQ = Slot("exp_avg_sq", quantizable=True, signed=False)


class FirstMoment(Technique):
    name = "first_moment"
    stage = "moments"
    fields = (BETAS,)
    slots = (EXP_AVG,)
    summary = "m <- b1 m + (1 - b1) g (8-bit blockwise when optim_bits=8)"

    def run(self, ctx) -> None:
        ctx.state("exp_avg").lerp_(ctx.m_in, 1.0 - ctx.hp["betas"][0])
        ctx.touch("exp_avg")


class SecondMoment(Technique):
    name = "second_moment"
    stage = "moments"
    fields = (BETAS,)
    slots = (EXP_AVG_SQ,)
    summary = "v <- b2 v + (1 - b2) g^2 (8-bit blockwise when optim_bits=8)"

    def run(self, ctx) -> None:
        b2 = ctx.hp["betas"][1]
        ctx.state("exp_avg_sq").mul_(b2).addcmul_(ctx.g, ctx.g, value=1.0 - b2)
        ctx.touch("exp_avg_sq")


class AdamNormalize(Technique):
    name = "adam_normalize"
    stage = "direction"
    fields = (EPS,)
    summary = "u = m_hat / (sqrt(v_hat) + eps) with bias correction"

    def scalars(self, hp, step):
        b1, b2 = hp["betas"]
        return {"root_bc2": math.sqrt(1.0 - b2 ** step), "bc1": 1.0 - b1 ** step}

    def run(self, ctx) -> None:
        s = ctx.scalars[self.name]
        denom = ctx.temp()
        torch.sqrt(ctx.state("exp_avg_sq"), out=denom)
        denom.div_(s["root_bc2"]).add_(ctx.hp["eps"])
        torch.div(ctx.state("exp_avg"), denom, out=ctx.u)
        ctx.step_scale /= s["bc1"]
