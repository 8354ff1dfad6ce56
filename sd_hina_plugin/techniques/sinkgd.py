"""The techniques of Automagic_Sinkgd (seed 000).

SinkGD (Scetbon, Ma, Gong, Meeds, arXiv 2502.06742): a matrix ``X`` (m x n) is normalised by ``L`` alternating
passes, rows to l2 norm sqrt(n) and columns to sqrt(m). After the passes the entries have RMS ~ 1 whatever the
gradient scale. We run the passes in scaling-vector form, ``X_L = diag(r) X diag(c)``:

    c = 1;  repeat L times:  r = sqrt(n) / sqrt(X^2 c^2)   (row norms of diag(r) X diag(c) set to sqrt(n))
                             c = sqrt(m) / sqrt((r^2)^T X^2)  (then column norms to sqrt(m))

This is the same arithmetic as alternating in place, but each pass is one batched mat-vec over ``X^2`` and
the scaled result is written once. Any tensor with ndim >= 2 is viewed as ``(shape[0], prod(rest))`` (conv
LoRA included). A 1-D tensor is one row normalised to norm sqrt(n) (RMS 1, the scale of a normalised
matrix). A scalar gets ``sign``.

The direction before normalisation (``sinkgd_momentum``):

* ``"nesterov"`` (default): ``m <- b1 m + (1 - b1) g``, then ``u = b1 m + (1 - b1) g`` (Nesterov momentum in
  the form Muon uses before its orthogonalisation);
* ``"grams"`` (the upstream fork): ``|m| * sign(g + m)`` for matrices and ``|m| * sign(g)`` for vectors, with
  the momentum m of the previous step; m is updated after.

The first step only initialises m and the gradient signs (ADOPT-style: no update from a single gradient).
Nesterov is the default because it measured better: on the U-Net LoRA task over 1000 steps the upstream's
direction ended 5% behind tuned AdamW and Nesterov's ahead of it (docs/benchmarks.md).

VRAdam (Vaidhyanathan et al., arXiv 2505.13196): the update is scaled per tensor by
``1 / (1 + min(3 * sum(m^2), 10))`` (the seed's beta3 = 3, alpha1 = 10).

Adaptive weight decay (AdaDecay, Nakamura & Hong, arXiv 1907.08931, per layer): ``z = (mean|g_p| - mu) / sigma``
over the tensors of the group, ``theta_p = 2 / (1 + exp(-4 z))``, ``p <- p (1 - lr * weight_decay * theta_p)``.
The statistics refresh every ``stats_update_freq`` steps and are kept on the device.
"""

from __future__ import annotations

import math

import torch

from ..config import Field
from ..engine.pack import join
from ..engine.technique import Slot, Technique
from .adaptive import LrMask

BETA1 = Field("beta1", "float", 0.9, "Momentum decay of the direction's momentum.", low=0.0, high=1.0, high_open=True)
ITERS = Field("sinkgd_iters", "int", 0, "SinkGD alternating passes; 0 = the upstream's choice: 4 (LoRA mode) or 5 (full_finetune).",
              low=0, high=64)
MOMENTUM = Field("sinkgd_momentum", "str", "nesterov",
                 "Direction before SinkGD: 'nesterov' (b1 m + (1 - b1) g with the new m) or 'grams' (the upstream's |m| sign(g + m)).",
                 choices=("nesterov", "grams"))
FULL = Field("full_finetune", "bool", False, "Full fine-tuning: no ALLoRA rows, 5 SinkGD passes, Prodigy condition against the initial weights.")
#: guards the row / column scales: with 1e-15 the squared scale of an all-zero row stays finite in fp32 (a
#: zero-initialised LoRA B has all-zero rows at first), so 0 * scale is 0, never 0 * inf
EPS = 1e-15


def sinkgd_iterations(hp) -> int:
    return hp["sinkgd_iters"] or (5 if hp["full_finetune"] else 4)


class SinkgdFirstStep(Technique):
    name = "sinkgd_first_step"
    stage = "moments"
    fields = (BETA1,)
    slots = (Slot("exp_avg"),)
    summary = "first step: initialise the momentum, no update"

    def run(self, ctx) -> None:
        if ctx.step == 1:
            ctx.state("exp_avg").lerp_(ctx.g, 1.0 - ctx.hp["beta1"])
            ctx.touch("exp_avg")
            ctx.done = True  # the lr mask records the gradient signs (LrMask.skipped)


class SinkgdDirection(Technique):
    spreads = ("rows", "cols")
    name = "sinkgd"
    stage = "direction"
    fields = (MOMENTUM, ITERS, FULL)
    summary = "u = Nesterov momentum (or the upstream's |m| sign(g + m)), SinkGD-normalised (rows to sqrt(n), columns to sqrt(m))"

    def run(self, ctx) -> None:
        m, g, u = ctx.state("exp_avg"), ctx.g, ctx.u
        iterations = sinkgd_iterations(ctx.hp)
        b1 = ctx.hp["beta1"]
        if ctx.hp["sinkgd_momentum"] == "nesterov":
            m.lerp_(g, 1.0 - b1)
            torch.lerp(g, m, b1, out=u)
            ctx.touch("exp_avg")
            self.normalize(ctx, u, iterations)
            return
        x2 = ctx.temp()
        for bucket in ctx.buckets:
            rows_u, rows_m, rows_g = bucket.rows(u), bucket.rows(m), bucket.rows(g)
            if len(bucket.shape) >= 2:
                torch.add(rows_g, rows_m, out=rows_u).sign_()
            else:
                torch.sign(rows_g, out=rows_u)
            rows_u.mul_(torch.abs(rows_m, out=bucket.rows(x2)))
        self.normalize(ctx, u, iterations)
        m.lerp_(g, 1.0 - b1)
        ctx.touch("exp_avg")

    @classmethod
    def normalize(cls, ctx, u: torch.Tensor, iterations: int) -> None:
        """The passes over every tensor of flat ``u``, in place. Pass by pass over all buckets, so that a pass's
        column sums (over rows a shard may not hold) are completed for the whole pack at once; a vector is one row
        normalised to norm sqrt(n): RMS 1, the scale of a SinkGD matrix. Compiled: the scales are applied in one
        multiply through ``Pack.spread_rows`` / ``Pack.spread_cols`` (writes into slices of a flat buffer would
        become one nested mask per bucket in the generated loop)."""
        pack = ctx.pack
        matrices = [b for b in pack.buckets if len(b.shape) >= 2]
        vectors = [b for b in pack.buckets if len(b.shape) < 2]
        x2 = ctx.temp()
        squares = [torch.mul(b.matrix(u), b.matrix(u), out=b.matrix(x2)) for b in matrices]
        scales = dict(zip(map(id, matrices), cls._passes(ctx, matrices, squares, iterations))) if matrices else {}
        if vectors:
            norms, offset = ctx.tensor_reductions(("norm", u), buckets=vectors)[0], 0
            for b in vectors:
                norm = norms[offset:offset + b.count].view(-1, 1, 1)
                offset += b.count
                scales[id(b)] = ((math.sqrt(b.full_numel) / (norm + EPS)).expand(b.count, b.n_rows, 1),
                                 torch.ones(b.count, 1, 1, device=u.device))
        if ctx.compiling:
            rows = join([scales[id(b)][0].reshape(-1) for b in pack.buckets])
            cols = join([scales[id(b)][1].reshape(-1) for b in pack.buckets])
            u.mul_(pack.spread_rows(rows).mul_(pack.spread_cols(cols)))
            return
        for b in pack.buckets:
            r, c = scales[id(b)]
            b.matrix(u).mul_(r).mul_(c)

    @staticmethod
    def _passes(ctx, buckets: list, squares: list[torch.Tensor], iterations: int) -> list[torch.Tensor]:
        """The scales ``(r, c)``, ``(k, m, 1)`` and ``(k, 1, n)``, of the passes over ``X^2`` of each bucket; the
        column sums of each pass completed for all buckets with one call (``ctx.across_rows_``)."""
        cs = [torch.ones(b.count, 1, b.n_cols, device=x2.device) for b, x2 in zip(buckets, squares)]
        rs = [None] * len(buckets)
        for _ in range(iterations):
            sums = []
            for i, (b, x2) in enumerate(zip(buckets, squares)):
                # (k, 1, n) vectors passed transposed: bmm's fast path here (a contiguous (k, n, 1) is ~8x slower on CPU)
                rs[i] = math.sqrt(b.n_cols) / (torch.bmm(x2, (cs[i] * cs[i]).transpose(1, 2)).sqrt_() + EPS)   # (k, m, 1)
                sums.append(torch.bmm((rs[i] * rs[i]).transpose(1, 2), x2))                                 # (k, 1, n)
            sums = ctx.across_rows_(sums)
            cs = [math.sqrt(b.full_rows) / (s.sqrt_() + EPS) for b, s in zip(buckets, sums)]
        return list(zip(rs, cs))


class VelocityRegularization(Technique):
    name = "vradam"
    stage = "scale"
    summary = "VRAdam: update scaled by 1 / (1 + min(3 sum(m^2), 10)) per tensor"

    def run(self, ctx) -> None:
        energy = ctx.tensor_norm(ctx.state("exp_avg")).square_()
        ctx.tensor_scale_(ctx.u, 1.0 / (1.0 + (3.0 * energy).clamp_(max=10.0)))


class ProdigyLrMask(LrMask):
    """The lr mask with the seed's Prodigy-style asymmetry: in the first half of warm-up, per tensor, the
    sign of ``c = -<g, theta - theta_0>`` (theta_0 = 0 for LoRA factors, the initial weights with
    ``full_finetune``) makes the upward bump (c > 0) or the downward bump (c < 0) ``d_coef`` times larger.

    The mask lattice has ``q`` steps per bump, the smallest q <= 16 for which ``d_coef * q`` is whole (1 for the
    default d_coef = 2), so both bumps are exact; another d_coef is applied to the nearest 1/16 of a bump."""

    name = "lr_mask"
    fields = LrMask.fields + (Field("d_coef", "float", 2.0, "Asymmetry of the lr-mask bumps in the first half of warm-up.", low=0.0, high=64.0),)
    slots = LrMask.slots + (Slot("sinkgd.anchor", dtype="bf16", init="param"),)

    def slots_for(self, hp, pack):
        return self.slots if hp["full_finetune"] else LrMask.slots

    def units(self, hp) -> int:
        d = hp["d_coef"]
        return next((q for q in range(1, 17) if abs(d * q - round(d * q)) <= 1e-9 * max(1.0, d * q)), 16)

    def bumps(self, ctx, units: int):
        if ctx.step >= ctx.hp["warmup_steps"] / 2 or ctx.hp["d_coef"] == 1.0:
            return units, units
        theta = ctx.params32()
        if ctx.hp["full_finetune"]:
            theta = ctx.temp().copy_(ctx.state("sinkgd.anchor")).neg_().add_(theta)
        c = -ctx.tensor_dot(ctx.g, theta)
        scaled = round(ctx.hp["d_coef"] * units)
        up = torch.where(c > 0, scaled, units).to(ctx.count_dtype)
        down = torch.where(c < 0, scaled, units).to(ctx.count_dtype)
        return up, down


class AdaptiveWeightDecay(Technique):
    name = "adaptive_weight_decay"
    stage = "apply"
    fields = (Field("lr", "float", 1e-5, "Learning rate; the lr mask multiplies it per element.", low=0.0),
              Field("weight_decay", "float", 5e-4, "Strength of the adaptive weight decay.", low=0.0),
              Field("stats_update_freq", "int", 5, "Steps between refreshes of the weight-decay statistics.", low=1))
    slots = (Slot("adadecay.theta", per_tensor=True, init="ones"),)
    summary = "AdaDecay per tensor: decay lr*wd*2*sigmoid(4 z), z of mean|g| among the group's tensors (all its packs)"

    def prepare(self, opt) -> None:
        """On refresh steps (the first update step, then every ``stats_update_freq`` steps), ``z`` of every
        tensor of each group, from all its packs at once: one ``_foreach_norm`` over the gradients. Tensors
        with a non-finite gradient are left out of mu and sigma and keep their theta (their step is skipped)."""
        for gi, group in enumerate(opt.param_groups):
            step = group["step"] + 1  # the step about to run
            if not self.enabled(group) or not group["weight_decay"] or (step - 2) % group["stats_update_freq"]:
                continue
            packs = opt._packs[gi]
            params = [p for pack in packs for p in pack.params]
            present = [opt.grad_of(p) is not None for p in params]
            if not any(present):
                continue
            grads = [opt.grad_of(p) for p, ok in zip(params, present) if ok]
            numels = torch.cat([pack.numels() for pack in packs])  # pack order, as ``params``
            if not all(present):
                index = opt.host_values(f"adadecay.present.{gi}", [i for i, ok in enumerate(present) if ok], numels.device)
                numels = numels[index]
            # fp32 norms (float64 gradients: in float64, as _foreach_norm cannot narrow, then fp32 like the rest)
            wide = any(x.dtype == torch.float64 for x in grads)
            l1 = torch.stack(torch._foreach_norm(grads, 1, dtype=None if wide else torch.float32)).float()
            l1 = opt.sum_across_ranks_(packs, l1, None if all(present) else index)  # (sharded: over all its rows)
            mean_abs = l1 / numels
            finite = torch.isfinite(mean_abs)
            count = finite.sum().clamp_min(1)
            values = torch.where(finite, mean_abs, 0.0)
            mu = values.sum() / count
            sigma = (torch.where(finite, mean_abs - mu, 0.0).square().sum() / count).sqrt()
            theta = torch.sigmoid((mean_abs - mu) / (sigma + 1e-12) * 4.0).mul_(2.0)
            old = torch.cat([pack.storage["adadecay.theta"] for pack in packs])  # pack order, as ``params``
            if all(present):
                new = torch.where(finite, theta, old)
            else:
                new = old.clone()
                new[index] = torch.where(finite, theta, old[index])
            for pack, part in opt.per_tensor_slices(packs, new):
                pack.storage["adadecay.theta"].copy_(part)

    def run(self, ctx) -> None:
        wd = ctx.hp["weight_decay"]
        if not wd:
            return
        theta = ctx.state("adadecay.theta")
        # float64 weights: the factor in float64 (1 - 1e-8 in fp32 would round the decay away or double it)
        ctx.decay = 1.0 - ctx.lr * wd * (theta.double() if ctx.pack.dtype == torch.float64 else theta)
