"""Cautious optimizers (Liang et al., arXiv 2411.16085), per tensor:

    mask = 1[u * g > 0]          u <- u * mask * numel / (sum(mask) + 1)

Update components that disagree in sign with the current gradient are dropped and the rest rescaled.
Placed before Grams, so that the pair means "move only where the momentum agrees with the gradient, with
the gradient's sign" (after Grams every sign agrees and the mask would keep everything).
"""

from __future__ import annotations

from ..config import Field
from ..engine.technique import Technique


class Cautious(Technique):
    name = "cautious"
    stage = "direction"
    summary = "zero update components whose sign disagrees with g, rescale by numel/(kept+1) per tensor"

    def __init__(self, switch: Field | None = None):
        self.switch = switch

    def run(self, ctx) -> None:
        mask = ctx.scratch("cautious")
        mask.copy_(ctx.u).mul_(ctx.g).gt_(0)  # 1.0 where u and g agree
        scale = ctx.numels() / (ctx.tensor_sum(mask) + 1.0)
        ctx.u.mul_(ctx.tensor_scale_(mask, scale))
