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
        anchored = dict(ctx.pack.tags).get(self.name) == "anchor"
        if anchored:  # fp32 copy first: mixed-dtype sub is 4x slower on CPU
            anchor = ctx.temp(0).copy_(ctx.state(ANCHOR.name))
            dev = torch.sub(theta, anchor, out=ctx.temp(1))  # theta_{t-1} - theta_0
        else:
            dev = theta  # theta_0 = 0: the deviation is theta itself (read only)
        c, norm_old = ctx.tensor_reductions(("dot", ctx.g, dev), ("norm", dev))
        c = c.neg_()
        u = ctx.u
        if ctx.lr_scale is not None:
            u.mul_(ctx.lr_scale)
            ctx.lr_scale = None
        # theta~, over the gathered fp32 values, which are not read again (bf16/fp16 packs: the writer still
        # needs them for the rounding rule)
        out = ctx.scratch("spd_new") if ctx.pack.low_precision else ctx.release_params32()
        new = self.decayed_step(ctx, theta, u, out)
        if anchored:
            dev = torch.sub(new, anchor, out=dev)  # theta~ - theta_0
        else:
            dev = new
        norm_new = ctx.tensor_norm(dev)
        ratio = ((norm_new - norm_old) / norm_new.clamp_min(1e-30)).clamp_(0.0, 1.0)
        pull = torch.where(c < 0, -lam * ratio, torch.zeros_like(ratio))
        # theta_t = theta~ + pull (theta~ - theta_0); with theta_0 = 0 that is theta~ (1 + pull)
        ctx.new_params = ctx.tensor_axpy_(new, dev, pull) if anchored else ctx.tensor_scale_(new, pull.add_(1.0))

    @staticmethod
    def decayed_step(ctx, theta: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = decay * theta - lr * step_scale * u`` in two passes at most (one without decay); ``out`` may
        be ``theta`` itself."""
        alpha = -ctx.lr * ctx.step_scale
        if ctx.compiling:  # one fused loop whatever the form; alpha as a factor (a keyword would specialize it)
            return ctx.decay_flat_(theta if out is theta else out.copy_(theta)).add_(u * alpha)
        decay, base = ctx.effective_decay(), ctx.decay
        if not isinstance(decay, torch.Tensor) and decay == 1.0:
            return torch.add(theta, u, alpha=alpha, out=out)
        if out is theta and not (isinstance(base, float) and base != 0.0):
            return ctx.decay_flat_(theta, decay).add_(u, alpha=alpha)
        if isinstance(base, float) and base != 0.0:
            # one decay d for the pack (1 for skipped tensors, whose u is 0): (theta + (alpha/d) u) * decay,
            # an in-place scale instead of a second three-operand pass
            return ctx.decay_flat_(torch.add(theta, u, alpha=alpha / base, out=out), decay)
        out = torch.mul(u, alpha, out=out)
        return ctx.tensor_axpy_(out, theta, decay) if isinstance(decay, torch.Tensor) else out.add_(theta, alpha=decay)
