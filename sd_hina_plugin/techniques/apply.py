"""The parameter write: decoupled weight decay and the step, with a rule for bf16/fp16 parameters.

    p <- p (1 - lr wd) - lr * step_scale * lr_scale * u        (Loshchilov & Hutter, arXiv 1711.05101)

bf16/fp16 parameters are updated in fp32 and written back by ``low_precision_update``:

* ``stochastic`` (default): unbiased stochastic rounding to bf16, so updates smaller than half a bf16
  ulp still move the weights on average (see ``numerics/rounding.py``);
* ``kahan``: a compensation buffer in the parameter dtype keeps what rounding dropped (2 B/param);
* ``nearest``: plain round-to-nearest, what ``torch.optim.AdamW`` does (small updates are lost).

fp32 parameters ignore the rule (nothing is rounded).
"""

from __future__ import annotations

from ..config import Field
from ..engine.technique import Slot, Technique

LR = Field("lr", "float", 1e-3, "Learning rate (the scheduler and kohya's per-group lrs override it per group).", low=0.0)
WEIGHT_DECAY = Field("weight_decay", "float", 1e-2, "Decoupled weight decay: p <- p (1 - lr wd).", low=0.0)
LOW_PRECISION_UPDATE = Field(
    "low_precision_update", "str", "stochastic",
    "How bf16/fp16 parameters receive the fp32 update: 'stochastic' rounding, 'kahan' compensation, or 'nearest'.",
    choices=("stochastic", "kahan", "nearest"))


class DecoupledStep(Technique):
    name = "decoupled_step"
    stage = "apply"
    fields = (LR, WEIGHT_DECAY, LOW_PRECISION_UPDATE)
    slots = (Slot("kahan_comp", dtype="param", low_precision_only=True),)
    writes_params = True
    summary = "decoupled weight decay, then p -= lr * u (stochastic rounding or Kahan for bf16 params)"

    def slots_for(self, hp, low_precision: bool):
        return super().slots_for(hp, low_precision) if hp["low_precision_update"] == "kahan" else ()

    def run(self, ctx) -> None:
        lr = ctx.lr
        u = ctx.u
        if ctx.lr_scale is not None:
            u.mul_(ctx.lr_scale)
        ctx.write_params(1.0 - lr * ctx.hp["weight_decay"], u, -lr * ctx.step_scale)
