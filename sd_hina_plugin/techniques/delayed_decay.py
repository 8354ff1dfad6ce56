"""Delayed decoupled weight decay for bf16 weights (the scheme of SimpleTuner's AdamWBF16).

A decay ``lr * wd`` per step is far below half a bf16 ulp of a weight of magnitude ~1, so applied every
step it would round away (or, with stochastic rounding, add noise for no benefit). Instead the group
accumulates ``lr * wd`` (host arithmetic, ``group["hina_wd_acc"]``, checkpointed) and applies the whole
accumulated decay ``p <- p (1 - acc)`` on the step where ``acc`` exceeds ``decay_threshold``, then resets.
The multiplicative result differs from per-step decay by O(acc^2) (< 2.5e-5 relative at the default
threshold of 5e-3). Dynamic weight decay (per-role ratios) applies on the step the decay is released.
"""

from __future__ import annotations

from ..config import Field
from ..engine.technique import Technique
from .apply import LR, WEIGHT_DECAY, decay_factors

THRESHOLD = Field("decay_threshold", "float", 5e-3, "Accumulated lr * weight_decay released at once when exceeded.", low=0.0)


class DelayedWeightDecay(Technique):
    name = "delayed_weight_decay"
    stage = "apply"
    fields = (LR, WEIGHT_DECAY, THRESHOLD)
    summary = "decoupled weight decay accumulated on the host and applied when it exceeds decay_threshold"

    def scalars(self, group, step):
        """The accumulation, on the host before the step's arithmetic: ``applied`` is the decay released at this
        step, or None (a compiled step gets one graph for each of the two cases, not one per accumulated value)."""
        if group.get("hina_wd_step") != step:  # accumulate once per group step, not per pack
            group["hina_wd_step"] = step
            group["hina_wd_acc"] = group.get("hina_wd_acc", 0.0) + group["lr"] * group["weight_decay"]
            group["hina_wd_release"] = group["hina_wd_acc"] > group["decay_threshold"]
            if group["hina_wd_release"]:
                group["hina_wd_applied"], group["hina_wd_acc"] = group["hina_wd_acc"], 0.0
        return {"applied": group["hina_wd_applied"] if group.get("hina_wd_release") else None}

    def run(self, ctx) -> None:
        applied = ctx.scalars[self.name]["applied"]
        ctx.decay = 1.0 if applied is None else decay_factors(ctx, applied)
