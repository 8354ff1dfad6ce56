"""Cautious optimizers (Liang et al., arXiv 2411.16085), per tensor:

    mask = 1[u * g > 0]          u <- u * mask * numel / (sum(mask) + 1)

Update components that disagree in sign with the current gradient are dropped and the rest rescaled.

Cautious and Grams act on the same components (those whose sign disagrees with the gradient): Cautious
drops them, Grams flips them. In either order one of the two makes the other a no-op, so an optimizer that
declares both gives Grams precedence (``yields_to``) and reports at construction that Cautious is inactive,
to users who set ``use_cautious`` themselves (``note_when_given``; both are on in HinaAdamWOptimizer's defaults).
"""

from __future__ import annotations

from ..config import Field
from ..engine.technique import Technique


class Cautious(Technique):
    name = "cautious"
    stage = "direction"
    summary = "zero update components whose sign disagrees with g, rescale by numel/(kept+1) per tensor"
    #: the note below is said only when the user set the switch (see optimizers/_declare.NotesOnGivenSwitches)
    note_when_given = True

    def __init__(self, switch: Field | None = None, yields_to: Field | None = None):
        super().__init__(switch)
        self.yields_to = yields_to

    def enabled(self, hp) -> bool:
        return super().enabled(hp) and not (self.yields_to is not None and hp[self.yields_to.name])

    def note(self, hp):
        if super().enabled(hp) and self.yields_to is not None and hp[self.yields_to.name]:
            return (f"{self.switch.name}=True has no effect while {self.yields_to.name}=True: both act on the update "
                    f"components whose sign disagrees with the gradient (Grams flips them, Cautious would drop them); "
                    f"set {self.yields_to.name}=False to use Cautious")
        return None

    def run(self, ctx) -> None:
        mask = ctx.temp()
        mask.copy_(ctx.u).mul_(ctx.g).gt_(0)  # 1.0 where u and g agree
        scale = ctx.numels() / (ctx.tensor_sum(mask) + 1.0)
        ctx.u.mul_(ctx.tensor_scale_(mask, scale))
