"""Selective Projection Decay (Tian, Huang & Kira, "Rethinking Weight Decay for Robust Fine-Tuning of
Foundation Models", NeurIPS 2024, arXiv 2411.01713), per tensor (a "layer" in the paper):

    c = -<g, theta_{t-1} - theta_0>
    theta~ = the optimizer's new value (decay and step applied)
    if c < 0:  r = clamp((||theta~ - theta_0|| - ||theta_{t-1} - theta_0||) / ||theta~ - theta_0||, 0, 1)
               theta_t = theta~ - lambda * r * (theta~ - theta_0)

``lambda`` is ``spd_lambda``. The condition's sign follows the authors' AdamSPD implementation; a third-party
reimplementation argues for the opposite sign, which we have not verified against experiments.

Anchors theta_0: the parameters' values when the optimizer state is created, stored in bf16 (2 B/param) and
checkpointed. Zero-initialised adapter factors (LoRA B/up, LoKr w2/w2_b, LoHa hada_w2_a, by role) use the
anchor 0 and store nothing: the packs are split by that distinction.
"""

from __future__ import annotations

import torch

from ..config import Field
from ..engine.technique import Slot, Technique
from ..lora.layout import ZERO_INIT_ROLES

ANCHOR = Slot("spd.anchor", dtype="bf16", init="param")


class SelectiveProjectionDecay(Technique):
    name = "spd"
    stage = "apply"
    uses_roles = True
    slots = (ANCHOR,)
    summary = "SPD: where -<g, theta - theta0> < 0, pull the new weights toward theta0 by lambda * growth ratio"

    def __init__(self, strength: Field, switch: Field | None = None):
        self.strength = strength
        self.fields = (strength,)
        super().__init__(switch)

    def pack_tag(self, opt, hp, p):
        return "zero" if opt.lora.role(p) in ZERO_INIT_ROLES else "anchor"

    def slots_for(self, hp, pack):
        return self.slots if dict(pack.tags).get(self.name) == "anchor" else ()

    def run(self, ctx) -> None:
        lam = ctx.hp[self.strength.name]
        theta = ctx.params32()
        anchor = None
        if dict(ctx.pack.tags).get(self.name) == "anchor":  # fp32 copy first: mixed-dtype sub is 4x slower on CPU
            anchor = ctx.scratch("spd_anchor").copy_(ctx.state(ANCHOR.name))
        dev = ctx.scratch("spd_dev")
        if anchor is not None:
            torch.sub(theta, anchor, out=dev)  # theta_{t-1} - theta_0
        else:
            dev.copy_(theta)
        c = -ctx.tensor_dot(ctx.g, dev)
        norm_old = ctx.tensor_norm(dev)
        u = ctx.u
        if ctx.lr_scale is not None:
            u.mul_(ctx.lr_scale)
            ctx.lr_scale = None
        new = ctx.scratch("spd_new")
        decay = ctx.effective_decay()
        if isinstance(decay, torch.Tensor) or decay != 1.0:
            ctx.decay_flat_(new.copy_(theta), decay).add_(u, alpha=-ctx.lr * ctx.step_scale)
        else:
            torch.add(theta, u, alpha=-ctx.lr * ctx.step_scale, out=new)
        if anchor is not None:
            torch.sub(new, anchor, out=dev)  # theta~ - theta_0
        else:
            dev.copy_(new)
        norm_new = ctx.tensor_norm(dev)
        ratio = ((norm_new - norm_old) / norm_new.clamp_min(1e-30)).clamp_(0.0, 1.0)
        ctx.new_params = ctx.tensor_axpy_(new, dev, torch.where(c < 0, -lam * ratio, torch.zeros_like(ratio)))
