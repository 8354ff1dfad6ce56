"""Automagic_Sinkgd (seed 000): momentum + SinkGD with the automagic lr mask.

A step, with t the group's step and W = warmup_steps:

    t = 1        momentum and gradient signs initialised, no update (ADOPT-style)
    grad         OrthoGrad on the raw gradient once t > W (orthograd=True)
    direction    m updated, u = b1 m + (1 - b1) g (Nesterov; sinkgd_momentum='grams': the upstream's |m| sign(g + m)
                 from the previous m, m updated after), SinkGD-normalised (sinkgd_iters passes; 1-D: RMS 1)
    scale        VRAdam factor; lr mask (per element, relative to the group lr: +lr_bump/lr0 where the gradient
                 keeps its sign, -lr_bump/lr0 where it flips, Prodigy-style d_coef asymmetry while t < W/2,
                 frozen after W); ALLoRA rows from the current weights (LoRA mode)
    apply        AdaDecay-style weight decay (strength weight_decay, statistics every stats_update_freq steps)

Differences from the original, on purpose:
- the direction is Nesterov momentum by default (measured: docs/benchmarks.md, "Automagic_Sinkgd's direction");
- conv (4-D) and 1-D tensors are normalised too;
- the mask multiplies the scheduler's lr instead of replacing it;
- there is no built-in post-warm-up decay to 10 % (use the lr scheduler);
- ALLoRA is recomputed from the current weights;
- weight_decay is a strength, not a gate;
- full_finetune works and its anchors are checkpointed;
- no host syncs.
"""

from __future__ import annotations

from typing import Any

from ..config import Field
from ..engine.base import HinaOptimizer
from ..registry import register
from ..techniques.apply import WriteParams
from ..techniques.lora_scales import AllLoraRowScale
from ..techniques.orthograd import OrthoGrad
from ..techniques.sinkgd import (FULL, AdaptiveWeightDecay, ProdigyLrMask, SinkgdDirection, SinkgdFirstStep,
                                 VelocityRegularization)
from ._declare import config_for

ORTHOGRAD = Field("orthograd", "bool", False, "OrthoGrad on the raw gradient after warm-up.")
ETA = Field("eta", "float", 2.0, "ALLoRA: rows scaled by 1/sqrt(||row||^2 + 1/eta^2) (LoRA mode).", low=0.0, low_open=True)


@register(summary="Momentum + SinkGD (row/column normalisation) with an automagic per-element lr mask, VRAdam, ALLoRA, AdaDecay")
class Automagic_Sinkgd(HinaOptimizer):  # noqa: N801 - the upstream name
    """Momentum + SinkGD with the automagic per-element lr mask (Prodigy-style bumps), VRAdam, ALLoRA, AdaDecay."""

    NAME = "Automagic_Sinkgd"
    TECHNIQUES = (
        OrthoGrad(ORTHOGRAD, phase="after_warmup"), SinkgdFirstStep(), SinkgdDirection(),
        VelocityRegularization(), ProdigyLrMask(switch=None), AllLoraRowScale(ETA, switch=FULL, switch_on=False),
        AdaptiveWeightDecay(), WriteParams(),
    )
    Config = config_for(NAME, TECHNIQUES, defaults={"warmup_steps": 500, "low_precision_update": "stochastic"})

    def adamw_keywords(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """AdamW's ``betas=(b1, b2)`` -> ``beta1=b1`` (SinkGD keeps no second moment, so b2 has no role); ``eps``
        is accepted and has no effect (SinkGD divides by no root of a second moment). Both said once at construction."""
        out = dict(kwargs)
        betas = out.pop("betas", None)
        if betas is not None:
            if not isinstance(betas, (tuple, list)) or not betas:
                raise TypeError(f"{self.NAME}: argument 'betas' = {betas!r}: expected AdamW's (b1, b2); this optimizer uses beta1 = b1")
            out["beta1"] = betas[0]
            self._note_once(f"betas={tuple(betas)!r} read as beta1={betas[0]!r} (SinkGD has no second moment: b2 unused)")
        if "eps" in out:
            del out["eps"]
            self._note_once("eps has no effect (SinkGD divides by no second-moment root)")
        return out
