"""The parameter write: decoupled weight decay and the step, with a rule for bf16/fp16 parameters.

    p <- p (1 - lr wd) - lr * step_scale * u        (Loshchilov & Hutter, arXiv 1711.05101)

bf16/fp16 parameters are updated in fp32 and written back by ``low_precision_update``:

* ``stochastic`` (default): unbiased stochastic rounding to bf16, so updates smaller than half a bf16
  ulp still move the weights on average (see ``numerics/rounding.py``);
* ``kahan``: a compensation buffer in the parameter dtype keeps what rounding dropped (2 B/param);
* ``nearest``: plain round-to-nearest, what ``torch.optim.AdamW`` does (small updates are lost).

fp32 parameters ignore the rule (nothing is rounded).
"""

from __future__ import annotations

import math

import torch

from ..config import Field
from ..engine.pack import upload
from ..engine.technique import Slot, Technique
from ..lora.names import Role

LR = Field("lr", "float", 1e-3, "Learning rate (the scheduler and kohya's per-group lrs override it per group).", low=0.0)
WEIGHT_DECAY = Field("weight_decay", "float", 1e-2, "Decoupled weight decay: p <- p (1 - lr wd).", low=0.0)
LOW_PRECISION_UPDATE = Field(
    "low_precision_update", "str", "stochastic",
    "How bf16/fp16 parameters receive the fp32 update: 'stochastic' rounding, 'kahan' compensation, or 'nearest'.",
    choices=("stochastic", "kahan", "nearest"))

ADAPTER_ROLES = frozenset(r for r in Role if r.family in ("lora", "lokr", "loha"))


def decay_factors(ctx, amount: float) -> float | torch.Tensor:
    """``1 - amount`` for the whole pack, or, while :class:`DynamicWeightDecay` relaxes the adapter factors by a
    ``ratio``, per tensor: ``1 - amount * ratio`` for adapter factors, ``1 - amount`` for the rest. The per-tensor
    form is one ``where`` over a device mask made on the first step, with both values computed on the host:
    a vector built from host floats every step would be an upload that waits for the GPU."""
    ratio = ctx.wd_ratio
    if ratio is None or (not ctx.compiling and not amount):
        return 1.0 - amount
    mask = ctx.pack.derived["adapter_mask"]
    if ctx.compiling:  # tensor arithmetic: a where over two symbolic floats would specialize them (a graph per value)
        return 1.0 - mask.float() * (amount * (ratio - 1.0)) - amount
    if ctx.pack.dtype == torch.float64:  # formed in float64 (a where over two Python floats gives fp32)
        return torch.full(mask.shape, 1.0 - amount, dtype=torch.float64, device=mask.device).masked_fill_(mask, 1.0 - amount * ratio)
    return torch.where(mask, 1.0 - amount * ratio, 1.0 - amount)


class DecoupledWeightDecay(Technique):
    name = "weight_decay"
    stage = "apply"
    fields = (LR, WEIGHT_DECAY)
    summary = "decoupled weight decay p <- p (1 - lr wd)"

    def run(self, ctx) -> None:
        ctx.decay = decay_factors(ctx, ctx.lr * ctx.hp["weight_decay"])


class DynamicWeightDecay(Technique):
    """Weight decay of adapter factors relaxed after ``wd_transition_steps``.

    For LoRA/LoKr/LoHa factors (by role), with T = ``wd_transition_steps`` and t the group step:

        wd_t = wd                                                   t <= T
        wd_t = wd * max(wd_min_ratio, wd_decay_factor ** ((t - T) / T))   t > T

    so the decay falls continuously from its full value and reaches the floor ``wd_min_ratio`` after
    T * ln(wd_min_ratio) / ln(wd_decay_factor) further steps (6456 with the defaults). Other parameters keep wd.
    Must come before :class:`DecoupledWeightDecay`.
    """

    name = "dynamic_weight_decay"
    stage = "apply"
    uses_roles = True
    fields = (
        Field("wd_transition_steps", "int", 1000, "Steps at full weight decay before adapter factors' decay relaxes.", low=1),
        Field("wd_decay_factor", "float", 0.7, "Adapter weight decay is multiplied by this per wd_transition_steps steps after the transition.", low=0.0, high=1.0, low_open=True),
        Field("wd_min_ratio", "float", 0.1, "Floor of the adapter weight-decay multiplier.", low=0.0, high=1.0),
    )
    summary = "adapter factors' weight decay decays exponentially after wd_transition_steps to wd_min_ratio"

    def __init__(self, switch: Field):
        super().__init__(switch)

    @staticmethod
    def multiplier(hp, step: int) -> float:
        T = hp["wd_transition_steps"]
        if step <= T:
            return 1.0
        return max(hp["wd_min_ratio"], hp["wd_decay_factor"] ** ((step - T) / T))

    def scalars(self, hp, step):
        # (the phase as a bool: a compiled step receives the ratio as a tensor, which it cannot branch on)
        return {"ratio": self.multiplier(hp, step), "relaxed": step > hp["wd_transition_steps"]}

    @staticmethod
    def adapter_mask(ctx) -> torch.Tensor:
        """Which tensors of the pack are adapter factors (bool, per tensor, on the device; made once per pack)."""
        pack = ctx.pack
        return pack.derive("adapter_mask", lambda: upload([ctx.opt.lora.role(p) in ADAPTER_ROLES for p in pack.params], pack.device))

    def before_graph(self, ctx) -> None:
        self.adapter_mask(ctx)  # made outside the graph (made in it, a change of state the next step recompiles for)

    def run(self, ctx) -> None:
        values = ctx.scalars[self.name]
        self.adapter_mask(ctx)
        ctx.wd_ratio = values["ratio"] if values["relaxed"] else None

    @staticmethod
    def steps_to_floor(hp) -> float:
        if hp["wd_min_ratio"] <= 0 or hp["wd_decay_factor"] >= 1:
            return math.inf
        return hp["wd_transition_steps"] * math.log(hp["wd_min_ratio"]) / math.log(hp["wd_decay_factor"])


class WriteParams(Technique):
    name = "write_params"
    stage = "apply"
    fields = (LOW_PRECISION_UPDATE,)
    slots = (Slot("kahan_comp", dtype="param", low_precision_only=True),)
    writes_params = True
    summary = "p <- p * decay - lr * u (stochastic rounding or Kahan for bf16 params)"

    def slots_for(self, hp, pack):
        return super().slots_for(hp, pack) if hp["low_precision_update"] == "kahan" else ()

    def run(self, ctx) -> None:
        u = ctx.u
        if ctx.new_params is None and ctx.lr_scale is not None:
            u.mul_(ctx.lr_scale)
        ctx.write_params(u, -ctx.lr * ctx.step_scale)
