"""ADOPT (Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate", arXiv 2411.02853).

    t = 1:   v <- g^2 and no update
    t > 1:   x = clip(g / max(sqrt(v), eps), (t-1)^(1/4))    (v from the previous step: it excludes g_t;
                                                             t - 1 is the paper's update count k, 1 at the first)
             m <- b1 m + (1 - b1) x        u = m               (no bias correction, as in the paper)
             v <- b2 v + (1 - b2) g^2                          (after the normalization)

:class:`AdoptScale` writes ``x`` into ``ctx.m_in`` (the first moment's input) and must come before
:class:`~sd_hina_plugin.techniques.adam.SecondMoment`; :class:`AdoptDirection` sets ``u = m``.
"""

from __future__ import annotations

import torch

from ..engine.technique import Technique
from .adam import EPS, EXP_AVG_SQ


class AdoptScale(Technique):
    name = "adopt_scale"
    stage = "moments"
    fields = (EPS,)
    slots = (EXP_AVG_SQ,)
    summary = "ADOPT: normalize g by the previous second moment (first step initializes v only)"

    def scalars(self, hp, step):
        return {"clip": (step - 1) ** 0.25}  # the paper's k counts updates: k = 1 at the first update (our step 2)

    def run(self, ctx) -> None:
        v, g = ctx.state("exp_avg_sq"), ctx.g
        if ctx.step == 1:
            torch.mul(g, g, out=v)
            ctx.touch("exp_avg_sq")
            ctx.done = True
            return
        # g / max(sqrt(v), eps) as g * rsqrt(max(v, eps^2)): the same value, passes that stay in place
        x = torch.clamp_min(v, ctx.hp["eps"] ** 2, out=ctx.moment_input()).rsqrt_().mul_(g)
        clip = ctx.scalars[self.name]["clip"]
        if ctx.compiling:  # clamp's bounds would be specialized (a graph per step): scale into [-1, 1] and back
            x.div_(clip).clamp_(-1.0, 1.0).mul_(clip)
        else:
            x.clamp_(-clip, clip)
        ctx.m_in = x


class AdoptDirection(Technique):
    name = "adopt_direction"
    stage = "direction"
    summary = "ADOPT: u = m"

    def run(self, ctx) -> None:
        ctx.set_u(ctx.state("exp_avg"))  # copied when u is next read (Grams reads m directly instead)
