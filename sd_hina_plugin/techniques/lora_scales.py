"""Per-role learning-rate scales for LoRA / LoKr / LoHa factors (stage ``scale``).

All three multiply the update direction ``ctx.u`` before the parameter write; each is declared with the
argument names of the optimizer that uses it.

* :class:`LoraPlusRatio` (LoRA+, Hayou et al., arXiv 2402.12354): the zero-initialised factor of each
  complete adapter module (LoRA B/up, LoKr ``w2``/``w2_b``, LoHa ``hada_w2_a``) gets ``ratio`` times the
  learning rate.
  Not applied when the pairs are split across param groups: that is kohya's own ``loraplus_lr_ratio``,
  whose "plus" groups already carry the ratio in their lr (applying it again would square it).
* :class:`AloraRowScale` (the ALoRA-style rule of HinaAdamW's seed: lr inversely proportional to the row
  norms of ``B A``): row ``i`` of B is scaled by ``1 / (1 + ||(B A)_i,:||)`` and A by
  ``1 / (1 + mean_i ||(B A)_i,:||)``, with the row norms computed in float64 from B and the r x r Gram
  matrix of A (``lora/factors.py``), never from the dense product. LoKr factors are scaled by
  ``1 / (1 + ||w1|| ||w2||)`` (the Frobenius norm of the Kronecker product). LoHa: by
  ``1 / (1 + ||w1a w1b|| ||w2a w2b||)``, an upper bound of the Hadamard product's norm.
* :class:`AllLoraRowScale` (ALLoRA, Huang & Balestriero, arXiv 2410.09692): every row of every tensor,
  viewed as a matrix ``(shape[0], prod(rest))`` (1-D tensors: one row per element), is scaled by
  ``1 / sqrt(||row||^2 + 1/eta^2)`` from the current weights, so zero rows move ``eta`` times faster and
  large rows slow down.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import Field
from ..engine.pack import join
from ..engine.technique import Technique
from ..lora.factors import as_matrices, batched_row_norms, exact_dtype, factor_norms
from ..lora.layout import ZERO_INIT_ROLES
from ..lora.names import Role


class LoraPlusRatio(Technique):
    uses_roles = True
    name = "lora_plus"
    stage = "scale"
    summary = "LoRA+ ratio on the zero-initialised factor (B/up, LoKr w2, LoHa w2_a); skipped if kohya's loraplus groups exist"

    def __init__(self, ratio: Field, switch: Field | None = None):
        self.ratio = ratio
        self.fields = (ratio,)
        super().__init__(switch)

    def applies(self, opt: Any) -> bool:
        return not opt.lora.roles_split_by_groups

    def layout_note(self, opt: Any, hp: Any) -> str | None:
        if hp[self.ratio.name] == 1.0 or self.applies(opt):
            return None
        return (f"our LoRA+ ratio ({self.ratio.name}={hp[self.ratio.name]:g}) is off: the LoRA factors' up and down halves are in "
                "separate param groups, as kohya's loraplus_lr_ratio makes them, and those groups' lrs already carry kohya's ratio")

    @staticmethod
    def spans(ctx) -> list[tuple[int, int]]:
        """The zero-initialised factors of complete modules as contiguous runs of the flat buffer (usually one per
        pack), derived once per pack."""
        layout, pack = ctx.opt.lora, ctx.pack
        return pack.derive("lora_plus.spans", lambda: pack.runs(
            [i for i, p in enumerate(pack.params)
             if layout.role(p) in ZERO_INIT_ROLES and (m := layout.module(p)) is not None and m.complete]))

    def before_graph(self, ctx) -> None:
        self.spans(ctx)  # derived outside the graph (made in it, a change of state the next step recompiles for)

    def run(self, ctx) -> None:
        ratio = ctx.hp[self.ratio.name]
        if ratio == 1.0 or not self.applies(ctx.opt):
            return
        for start, end in self.spans(ctx):
            ctx.u[start:end].mul_(ratio)


class AloraRowScale(Technique):
    uses_roles = True
    spreads = ("rows",)
    name = "alora_rows"
    stage = "scale"
    summary = "ALoRA-style scale 1/(1+||row of BA||) from B and A's Gram matrix; LoKr/LoHa by the product norm"

    @staticmethod
    def _plan(opt) -> dict[str, Any]:
        """Pairs grouped by (whole tensors') shape and LoKr/LoHa modules, derived once per layout."""
        layout = opt.lora
        plan = layout.cache.get("alora")
        if plan is None:
            pairs = [layout.members(m) for m in layout.complete("lora") if Role.LORA_MID not in m.members]
            classes: dict[tuple, tuple[list, list]] = {}
            for m in pairs:
                b, a = m[Role.LORA_B], m[Role.LORA_A]
                bs, as_ = classes.setdefault((opt.layout_of(b), opt.layout_of(a)), ([], []))
                bs.append(b)
                as_.append(a)
            plan = {"classes": list(classes.values()), "buffers": {},
                    "families": {f: [layout.members(m) for m in layout.complete(f)] for f in ("lokr", "loha")}}
            layout.cache["alora"] = plan
        return plan

    def prepare(self, opt: Any) -> None:
        plan = self._plan(opt)
        scales: dict[int, torch.Tensor] = {}
        for index, (bs, as_) in enumerate(plan["classes"]):  # one batch per shape class
            buffers = plan["buffers"].setdefault(index, {})  # persistent: no 10 MB allocations per step
            # A whole (its Gram matrix spans all its rows), stacked in float64; B's rows as held (sharded: this rank's)
            a = as_matrices(opt.whole(as_), buffers, "a", exact_dtype(as_[0].device))
            rows = batched_row_norms(as_matrices(bs, buffers, "b"), a, buffers)
            b_shape = (rows.shape[0], rows.shape[1], *([1] * (bs[0].dim() - 1)))
            scales.update(zip(map(id, bs), (1.0 / (1.0 + rows)).view(b_shape).unbind(0)))
            mean = opt.sum_rows_(bs, rows.sum(-1)).div_(opt.full_shape(bs[0])[0])  # mean over all rows of BA
            scales.update(zip(map(id, as_), (1.0 / (1.0 + mean)).unbind(0)))
        for family, modules in plan["families"].items():
            if modules:
                whole = iter(opt.whole([p for m in modules for p in m.values()]))  # (sharded: one collective)
                entire = [{role: next(whole) for role in m} for m in modules]
                for members, norm in zip(modules, (1.0 / (1.0 + factor_norms(family, entire))).unbind(0)):
                    for p in members.values():
                        scales[id(p)] = norm
        opt.step_cache[self.name] = scales

    def before_graph(self, ctx) -> None:
        """Compiled: the pack's scales as one vector, a value per row (B: its rows' scales; A and LoKr/LoHa factors:
        their one value on every row; others 1), applied in the graph through ``Pack.spread_rows``."""
        scales = ctx.opt.step_cache.get(self.name)
        pack = ctx.pack
        if not scales or not any(id(p) in scales for p in pack.params):
            return
        ones = pack.derive("alora.ones", lambda: torch.ones(max(p.shape[0] if p.dim() else 1 for p in pack.params), device=pack.device))
        parts = []
        for p in pack.params:
            rows = p.shape[0] if p.dim() else 1
            s = scales.get(id(p))
            parts.append(ones[:rows] if s is None else s.reshape(-1).expand(rows) if s.numel() == 1 else s.reshape(-1))
        ctx.inputs[self.name] = torch.cat(parts)

    def run(self, ctx) -> None:
        if ctx.compiling:
            rows = ctx.inputs.get(self.name)
            if rows is not None:
                ctx.u.mul_(ctx.pack.spread_rows(rows))
            return
        scales = ctx.opt.step_cache.get(self.name)
        if not scales:
            return
        views = ctx.pack.views(ctx.u)
        pairs = [(views[i], scales[id(p)]) for i, p in enumerate(ctx.pack.params) if id(p) in scales]
        if pairs:
            torch._foreach_mul_([v for v, _ in pairs], [s for _, s in pairs])


class AllLoraRowScale(Technique):
    spreads = ("rows",)
    name = "allora_rows"
    stage = "scale"
    summary = "ALLoRA: rows scaled by 1/sqrt(||row||^2 + 1/eta^2) from the current weights (conv kernels as matrices)"

    def __init__(self, eta: Field, switch: Field | None = None, switch_on: bool = True):
        self.eta = eta
        self.fields = (eta,)
        super().__init__(switch, switch_on)

    def run(self, ctx) -> None:
        inv_eta2 = 1.0 / ctx.hp[self.eta.name] ** 2
        weights = ctx.params32()  # gathered once per step, shared with other techniques
        if ctx.compiling:  # row norms bucket by bucket (reads), applied in one multiply through Pack.spread_rows
            norms = join([torch.linalg.vector_norm(b.matrix(weights), dim=-1).reshape(-1) for b in ctx.buckets])
            ctx.u.mul_(ctx.pack.spread_rows(norms.square_().add_(inv_eta2).rsqrt_()))
            return
        for bucket in ctx.buckets:
            norms = torch.linalg.vector_norm(bucket.matrix(weights), dim=-1, keepdim=True)
            bucket.matrix(ctx.u).mul_(norms.square_().add_(inv_eta2).rsqrt_())
