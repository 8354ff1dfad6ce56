"""The adaptive layer of AdamW_HinaAdaptive / AdamWBF16_HinaAdaptive (seed 003), and its per-element lr mask.

:class:`AdaptiveImportance`: a per-tensor importance that scales the update.

* Each step, per tensor, three statistics are averaged (EMA with ``importance_decay``):
  gradient consistency ``(1 + cos(m, g)) / 2``, change rate ``lr ||u|| / max(||theta||, lr ||u||)`` (the
  relative step, at most 1: a zero-initialised LoRA B factor has ``||theta|| = 0`` at first) and gradient
  signal-to-noise: ``||m|| / sqrt(sum v)``, or under ADOPT (where ``m`` averages the already normalised
  ``g / sqrt(v)``) the RMS of ``m``, ``||m|| / sqrt(numel)``. Both are independent of the gradient's scale.
* Once per step, over all parameters of the optimizer, each statistic is divided by its mean, so it becomes
  a relative signal, and ``contribution = 0.4 consistency + 0.3 change + 0.3 snr`` (the seed's weights) has
  mean 1. Then ``importance <- d * importance + (1 - d) * contribution``. Importance starts at 1 and stays
  centred on 1: it is not a slow decay toward a floor.
* Every ``relationship_discovery_interval`` steps, relationships are rebuilt. Known LoRA/LoKr/LoHa pairs come
  first (compatibility 1). Then shape-chainable candidates: a matrix ``X (m x k)`` and the first unused
  ``Y (k x n)``, found by hashing dimensions (O(N), never all pairs). A candidate is scored by the absolute
  correlation between the column norms of X and the row norms of Y over the shared dimension, and kept if
  the score reaches ``compatibility_threshold``.
* Related tensors share importance: ``imp_i <- (1 - c/2) imp_i + (c/2) imp_partner``.
* The update is scaled by ``clamp(importance^a, 1/(1+a), 1+a)``, ``a = adaptation_strength``: ``a = 0`` no
  effect, ``a = 1`` the importance itself, larger ``a`` a stronger adjustment (importance stays near
  0.8-1.6 on LoRA runs, so a bound alone, as before, left every ``a >= 1`` identical).

All of it is per-tensor state (``adapt.*`` keys) computed on the device: checkpointed, moved with the
optimizer, no host syncs. ``importance_decay`` and ``relationship_discovery_interval`` are read from the
first param group; the other arguments per group.

:class:`LrMask` (the Automagic per-element lr mask, made relative): a multiplier per element, starting at 1
and bounded by ``[min_lr, max_lr] / lr0`` (``lr0`` = the group's lr at the first step). For the first
``warmup_steps`` steps it moves ``+lr_bump/lr0`` where the gradient keeps its sign and ``-lr_bump/lr0``
where it flips; it is frozen afterwards. Because it multiplies ``group["lr"]``, the scheduler and
per-group lrs keep working.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import Field
from ..engine.pack import upload
from ..engine.technique import Slot, Technique
from ..lora.factors import as_matrices
from ..lora.names import Role

USE_DYNAMIC = Field("use_dynamic_adaptation", "bool", True, "Scale each tensor's update by its relative importance.")
STRENGTH = Field("adaptation_strength", "float", 1.0,
                 "Strength a of the importance scaling: updates scaled by importance^a, within [1/(1+a), 1+a]; 0 disables it.", low=0.0)
INTERVAL = Field("relationship_discovery_interval", "int", 100, "Steps between rebuilds of parameter relationships.", low=1)
DECAY = Field("importance_decay", "float", 0.95, "EMA decay of the importance statistics and of importance itself.", low=0.0, high=1.0, high_open=True)
THRESHOLD = Field("compatibility_threshold", "float", 0.3, "Minimum compatibility for a discovered (unnamed) relationship.", low=0.0, high=1.0)

STATS = ("adapt.consistency", "adapt.change", "adapt.snr")
WEIGHTS = (0.4, 0.3, 0.3)
#: representative member of each side of an adapter module, for relationships
_SIDES = {
    "lora": ((Role.LORA_B,), (Role.LORA_A,)),
    "lokr": ((Role.LOKR_W1, Role.LOKR_W1_A), (Role.LOKR_W2, Role.LOKR_W2_A)),
    "loha": ((Role.HADA_W1_A,), (Role.HADA_W2_A,)),
}


class AdaptiveImportance(Technique):
    spans_groups = True
    name = "adaptive_importance"
    stage = "scale"
    fields = (STRENGTH, INTERVAL, DECAY, THRESHOLD)
    slots = (Slot("adapt.importance", per_tensor=True, init="ones"),
             *(Slot(k, per_tensor=True) for k in STATS),
             Slot("adapt.partner", per_tensor=True), Slot("adapt.compat", per_tensor=True))
    summary = "per-tensor relative importance (consistency, change rate, SNR) and relationships scale the update"

    def __init__(self, switch: Field = USE_DYNAMIC):
        super().__init__(switch)

    # -- once per step, over all packs -------------------------------------------------------------------
    def prepare(self, opt: Any) -> None:
        packs, importance = opt.per_tensor("adapt.importance")
        if importance is None:
            return
        hp = opt.param_groups[0]
        done = hp["step"]  # steps completed so far
        if done > 0:
            decay = hp["importance_decay"]
            contribution = torch.zeros_like(importance)
            for key, weight in zip(STATS, WEIGHTS):
                values = opt.per_tensor(key)[1]
                contribution.add_(values / values.mean().clamp_min(1e-30), alpha=weight)
            updated = importance * decay + contribution * (1.0 - decay)
            present = [opt.grad_of(p) is not None for pack in packs for p in pack.params]
            if all(present):
                importance = updated
            else:  # tensors without a gradient this step keep their importance
                importance = torch.where(opt.host_values("adaptive.present", present, importance.device), updated, importance)
            if done % hp["relationship_discovery_interval"] == 0:
                self.discover(opt, packs)
        else:
            self.pairs(opt, packs)  # built on the first step, which may upload
        partner = opt.per_tensor("adapt.partner")[1].long()
        compat = opt.per_tensor("adapt.compat")[1]
        shared = importance[(partner - 1).clamp_min(0)]
        blended = torch.where(partner > 0, importance * (1 - compat / 2) + shared * (compat / 2), importance)
        for pack, part in opt.per_tensor_slices(packs, importance):
            pack.storage["adapt.importance"].copy_(part)
        opt.step_cache[self.name] = {id(pack): part for pack, part in opt.per_tensor_slices(packs, blended)}

    @staticmethod
    def pairs(opt: Any, packs: list) -> dict[str, Any]:
        """Who may be related, from names and shapes alone: the known adapter pairs, and shape-chainable
        candidates grouped by shape class, with their index vectors on the device. Found once per layout and
        set of packs (at the first step, which may upload), not at every discovery."""
        params = [p for pack in packs for p in pack.params]
        key = ("adaptive.pairs", tuple(map(id, params)))
        found = opt.lora.cache.get(key)
        if found is not None:
            return found
        device = packs[0].device
        index = {id(p): i for i, p in enumerate(params)}
        layout, used = opt.lora, set()
        known: list[tuple[int, int]] = []
        for family, (left, right) in _SIDES.items():
            for module in layout.complete(family):
                members = layout.members(module)
                x = next((members[r] for r in left if r in members), None)
                y = next((members[r] for r in right if r in members), None)
                if x is not None and y is not None and id(x) in index and id(y) in index:
                    known.append((index[id(x)], index[id(y)]))
                    used.update(known[-1])
        shapes = [opt.full_shape(p) for p in params]  # (of the whole tensors, where they are sharded)
        by_rows: dict[int, list[int]] = {}
        for i, shape in enumerate(shapes):
            if i not in used and len(shape) >= 2:
                by_rows.setdefault(shape[0], []).append(i)
        candidates: dict[tuple, list[tuple[int, int]]] = {}
        for i, shape in enumerate(shapes):
            if i in used or len(shape) < 2:
                continue
            for j in by_rows.get(math.prod(shape[1:]), []):
                if j != i and j not in used:
                    used.update((i, j))
                    candidates.setdefault((opt.layout_of(params[i]), opt.layout_of(params[j])), []).append((i, j))
                    break

        def on_device(pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
            return upload([i for i, _ in pairs], device), upload([j for _, j in pairs], device)

        found = opt.lora.cache[key] = {
            "params": params, "known": known, "known_index": on_device(known) if known else None,
            "candidates": [(pairs, on_device(pairs)) for pairs in candidates.values()]}
        return found

    def discover(self, opt: Any, packs: list) -> None:
        """Relationships: known adapter pairs, then shape-chainable candidates scored on the device (no sync)."""
        found = self.pairs(opt, packs)
        params = found["params"]
        device = packs[0].device
        partner = torch.zeros(len(params), device=device)
        compat = torch.zeros(len(params), device=device)
        groups = [(found["known_index"], torch.ones(len(found["known"]), device=device))] if found["known"] else []
        threshold = opt.param_groups[0]["compatibility_threshold"]
        for pairs, index in found["candidates"]:  # one batch per shape class
            xs, ys = [params[i] for i, _ in pairs], [params[j] for _, j in pairs]
            x = opt.sum_rows_(xs, as_matrices(xs).square().sum(dim=1)).sqrt_()  # column norms of X over the shared dim
            y = opt.complete_rows(ys, as_matrices(ys).norm(dim=2))            # row norms of Y over the shared dim
            x = x - x.mean(1, keepdim=True)
            y = y - y.mean(1, keepdim=True)
            score = ((x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-30)).abs()
            groups.append((index, torch.where(score >= threshold, score, torch.zeros_like(score))))
        for (left, right), score in groups:
            linked = score > 0
            partner[left] = torch.where(linked, right + 1.0, 0.0)
            partner[right] = torch.where(linked, left + 1.0, 0.0)
            compat[left] = score
            compat[right] = score
        for key, vector in (("adapt.partner", partner), ("adapt.compat", compat)):
            for pack, part in opt.per_tensor_slices(packs, vector):
                pack.storage[key].copy_(part)

    # -- per pack ------------------------------------------------------------------------------------------
    def run(self, ctx) -> None:
        decay = ctx.hp["importance_decay"]
        m, g = ctx.state("exp_avg"), ctx.g
        adopt = bool(ctx.hp.get("use_adopt_stability", False))
        terms = [("norm", m), ("norm", g), ("dot", m, g), ("norm", ctx.u)]
        if not adopt:
            terms.append(("sum", ctx.state("exp_avg_sq")))
        m_norm, g_norm, dot, u_norm, *v_sum = ctx.tensor_reductions(*terms)
        norms = m_norm * g_norm
        consistency = torch.where(norms > 0, dot / norms.clamp_min(1e-30), torch.zeros_like(norms))
        # relative change ||lr u|| / ||w||, divided by max(||w||, ||lr u||) so it is at most 1: a zero-initialised
        # factor (LoRA B, weights 0 at first) would otherwise start near 1e8 and hold the mean for hundreds of steps
        step_norm = u_norm * abs(ctx.lr * ctx.step_scale)
        change = step_norm / torch.maximum(ctx.param_norms(), step_norm).clamp_min(1e-30)
        if adopt:
            # ADOPT: m is the EMA of g / sqrt(v) (dimensionless) while v holds raw g^2, so ||m|| / sqrt(sum v) would grow
            # as a tensor's gradients shrink. The RMS of m, ||m|| / sqrt(numel), is already mean / root-mean-square.
            snr = m_norm / ctx.numels().clamp_min(1).sqrt()
        else:  # m and v both in gradient units
            snr = m_norm / v_sum[0].clamp_min(0).sqrt().clamp_min(1e-30)
        for key, value in zip(STATS, (consistency.add_(1).mul_(0.5), change, snr)):
            ctx.state(key).lerp_(value, 1.0 - decay)
        blended = ctx.opt.step_cache.get(self.name, {}).get(id(ctx.pack))
        if blended is not None:
            a = ctx.hp["adaptation_strength"]
            if a:  # importance^a: a = 1 the importance itself, a > 1 sharper, a < 1 milder; bounded as documented
                ctx.tensor_scale_(ctx.u, blended.pow(a).clamp_(1.0 / (1.0 + a), 1.0 + a))


USE_LR_MASK = Field("use_lr_mask", "bool", True, "Per-element lr multiplier learned from gradient sign agreement during warm-up.")
LR_BUMP = Field("lr_bump", "float", None,
                "Absolute step of the per-element lr (lr units); None: lr_mask_bump times the group's lr.", low=0.0, optional=True)
MIN_LR = Field("min_lr", "float", None,
               "Absolute lower bound of the per-element lr; None: lr_mask_bounds[0] times the group's lr.", low=0.0, optional=True)
MAX_LR = Field("max_lr", "float", None,
               "Absolute upper bound of the per-element lr; None: lr_mask_bounds[1] times the group's lr.", low=0.0, optional=True)
MASK_BUMP = Field("lr_mask_bump", "float", 0.01,
                  "Step of the lr mask's multiplier per step, as a fraction of the group's lr (when lr_bump is None).", low=0.0)
MASK_BOUNDS = Field("lr_mask_bounds", "floats", (0.1, 10.0),
                    "Bounds of the lr mask's multiplier, relative to the group's lr (when min_lr / max_lr are None).",
                    low=0.0, length=2)
WARMUP = Field("warmup_steps", "int", 500, "Steps during which the lr mask learns; frozen afterwards.", low=0)


def mask_unit(group) -> float:
    """The lr mask's unit ``lr0``: the group's lr when the optimizer was built (``hina_lr0``), the lr the user
    asked for. Never a value a scheduler passes through: a warm-up from 0 would otherwise make the unit tiny
    and every bound and bump (``/ lr0``) huge. A group built with lr 0 takes the scheduler's ``initial_lr``,
    else its first positive lr (then kept). 0 while none is known: the mask then waits."""
    lr0 = float(group.get("hina_lr0") or 0.0)
    if lr0 > 0:
        return lr0
    for candidate in (group.get("initial_lr"), group.get("lr")):
        if candidate is not None and float(candidate) > 0:
            group["hina_lr0"] = float(candidate)
            return group["hina_lr0"]
    return 0.0


def mask_settings(hp, lr0: float) -> tuple[float, float, float]:
    """(bump, lo, hi) of the mask's multiplier for unit ``lr0``: ``lr_bump``, ``min_lr``, ``max_lr`` divided by
    ``lr0`` where given (absolute lrs, as in the upstream configs), else the relative ``lr_mask_bump`` and
    ``lr_mask_bounds``. The per-element lr is ``lr * multiplier``, so it lies in ``[lo, hi] * lr``: within
    ``[min_lr, max_lr]`` whenever the schedule's lr is at most the built-with lr."""
    rel_lo, rel_hi = hp["lr_mask_bounds"]
    bump = hp["lr_bump"] / lr0 if hp["lr_bump"] is not None else hp["lr_mask_bump"]
    lo = hp["min_lr"] / lr0 if hp["min_lr"] is not None else rel_lo
    hi = hp["max_lr"] / lr0 if hp["max_lr"] is not None else rel_hi
    return bump, lo, hi


def lattice_bounds(delta: float, lo: float, hi: float) -> tuple[int, int]:
    """The lattice indices j with ``1 + j delta`` inside ``[lo, hi]`` (int16 range): an lr mask that starts at 1
    and only moves by whole multiples of ``delta`` lives on these points."""
    j_min = math.ceil((lo - 1.0) / delta - 1e-9)
    j_max = math.floor((hi - 1.0) / delta + 1e-9)
    if j_max < j_min:  # no lattice point within the bounds: the one nearest to them
        j_max = j_min = j_min if lo > 1.0 else j_max
    return max(j_min, -32767), min(j_max, 32767)


class LrMask(Technique):
    """The Automagic per-element lr multiplier, stored exactly: it starts at 1 and only moves by whole bumps
    (or whole fractions of a bump, see :meth:`units`), so it is kept as an int16 count of lattice steps
    ``j`` (multiplier ``1 + j * delta``). No bump can be rounded away (a bf16 multiplier near 1 has a 0.8 %
    ulp) and no random numbers are needed (stochastic rounding of a bf16 mask cost ~17 ms per 4.9 M
    elements on CPU)."""

    name = "lr_mask"
    stage = "scale"
    fields = (LR_BUMP, MIN_LR, MAX_LR, MASK_BUMP, MASK_BOUNDS, WARMUP)
    slots = (Slot("lr_mask.steps", dtype="int16"), Slot("lr_mask.sign", dtype="int8"))
    summary = "Automagic-style per-element lr multiplier (relative to the group lr), learned during warm-up, kept exactly"

    def __init__(self, switch: Field = USE_LR_MASK):
        super().__init__(switch)

    def prepare(self, opt: Any) -> None:
        # every pack's entry of the mask means exists before any pack steps: a compiled step that adds a key to the
        # dict is guarded on its length, which grows as the packs of the first step add theirs (a graph per pack
        # compiled for nothing)
        for pack in opt.packs():
            opt.mask_means.setdefault(id(pack), None)

    def units(self, hp) -> int:
        """Lattice steps per bump (1 here; subclasses with fractional bumps use more)."""
        return 1

    def delta(self, hp, lr0: float) -> float:
        return mask_settings(hp, lr0)[0] / self.units(hp)

    def multiplier_bounds(self, group) -> tuple[float, float]:
        """The documented bounds of the multiplier (the per-element lr is ``group["lr"]`` times it)."""
        lr0 = mask_unit(group)
        return mask_settings(group, lr0)[1:] if lr0 > 0 else (1.0, 1.0)

    def mask_of(self, opt, group, p) -> torch.Tensor:
        """The multiplier of parameter ``p`` (fp32, relative to the group's lr)."""
        return self.multiplier(group, opt.state[p]["lr_mask.steps"].float())

    def multiplier(self, group, steps: torch.Tensor) -> torch.Tensor:
        """``1 + delta * j`` for lattice counts ``steps`` (fp32); ones while the mask has no unit yet."""
        lr0 = mask_unit(group)
        return 1.0 + self.delta(group, lr0) * steps if lr0 > 0 else torch.ones_like(steps)

    # -- what subclasses with another storage or polarity replace ----------------------------------------------
    def agreement(self, ctx) -> torch.Tensor:
        """Where this step's gradient sign equals the previous step's (bool); records this step's signs."""
        current = ctx.temp(0, torch.int8).copy_(torch.sign(ctx.g, out=ctx.temp()))
        sign = ctx.state("lr_mask.sign")
        agree = torch.eq(current, sign, out=ctx.temp(1, torch.bool))
        sign.copy_(current)
        return agree

    def read_steps(self, ctx, lr0: float) -> torch.Tensor:
        """The lattice counts ``j`` (int16), updated in place by :meth:`run`."""
        return ctx.state("lr_mask.steps")

    def write_steps(self, ctx, steps: torch.Tensor, lr0: float) -> None:
        """Store the updated counts (nothing to do when :meth:`read_steps` returned the storage itself)."""

    def bounds(self, ctx, delta: float, lr0: float) -> tuple[int, int]:
        return lattice_bounds(delta, *mask_settings(ctx.hp, lr0)[1:])

    # -- the step -------------------------------------------------------------------------------------------
    def run(self, ctx) -> None:
        hp = ctx.hp
        lr0 = mask_unit(hp)
        if lr0 <= 0:  # built with lr 0 and no positive lr seen yet: nothing to scale
            return
        delta = self.delta(hp, lr0)
        agree = self.agreement(ctx) if ctx.step <= hp["warmup_steps"] else None
        if delta == 0:  # no bumps: the multiplier is 1, kept within the bounds
            fixed = self.fixed_multiplier(hp, lr0)
            if ctx.opt.mask_means.get(id(ctx.pack)) is None:
                self.record_mean(ctx, fixed=fixed)
            ctx.u.mul_(fixed)
            return
        steps = self.read_steps(ctx, lr0)
        if agree is not None and ctx.step > 1:  # the first step only records the signs
            up, down = self.bumps(ctx, self.units(hp))  # the sign held: +up; it flipped: -down
            if isinstance(up, int):
                steps.add_(agree, alpha=up + down).sub_(down)
            else:  # per-tensor bumps (int16 vectors)
                change = ctx.temp(0, ctx.count_dtype).copy_(agree)
                both = up + down
                if ctx.compiling:  # the per-tensor bumps broadcast by Pack.spread (no writes into slices)
                    steps.add_(change.mul_(ctx.pack.spread(both)).sub_(ctx.pack.spread(down)))
                else:
                    for b in ctx.pack.buckets:  # j += (up + down) * agree - down: 2x faster than building the change first
                        part = slice(b.first, b.first + b.count)
                        b.rows(steps).addcmul_(b.rows(change), both[part].unsqueeze(1)).sub_(down[part].unsqueeze(1))
            steps.clamp_(*self.bounds(ctx, delta, lr0))
            self.write_steps(ctx, steps, lr0)
            ctx.touch("lr_mask.steps")
        elif ctx.step == 1:  # absolute bounds that exclude the built-with lr: the mask starts at the nearest bound
            self.clamp_start(ctx, steps, delta, lr0)
        count = ctx.temp().copy_(steps)
        if ctx.step <= hp["warmup_steps"] + 1 or ctx.opt.mask_means.get(id(ctx.pack)) is None:
            self.record_mean(ctx, count, delta)  # frozen masks are not re-read
        ctx.u.addcmul_(ctx.u, count, value=delta)  # u (1 + delta j)

    @staticmethod
    def fixed_multiplier(hp, lr0: float) -> float:
        """The multiplier without bumps (``lr_bump=0``): 1, kept within the bounds."""
        _, lo, hi = mask_settings(hp, lr0)
        return min(max(1.0, lo), hi)

    @staticmethod
    def record_mean(ctx, count: torch.Tensor | None = None, delta: float = 0.0, fixed: float = 1.0) -> None:
        """The mask's mean over the pack's elements (``1 + delta * mean(count)``, or ``fixed``), for hina/avg_lr:
        a 0-d device tensor, read only when stats() are."""
        real = sum(b.full_numel * b.count for b in ctx.pack.buckets)  # whole tensors; padding of 8-bit packs excluded
        if count is None:
            mean = torch.full((), fixed, dtype=torch.float32, device=ctx.pack.device)
        else:
            mean = 1.0 + delta * ctx.tensor_sum(count).sum() / real
        ctx.opt.mask_means[id(ctx.pack)] = (ctx.pack.group_index, mean, real)

    def record(self, ctx) -> None:
        """Store this step's gradient signs (the first step's, for the second step to compare against)."""
        self.agreement(ctx)

    def skipped(self, ctx) -> None:
        if ctx.step <= ctx.hp["warmup_steps"]:
            self.record(ctx)
        if ctx.step == 1 and (lr0 := mask_unit(ctx.hp)) > 0:
            # the first step of ADOPT / CAME / SinkGD ends before the mask: it starts here, and hina/avg_lr with it
            delta = self.delta(ctx.hp, lr0)
            if delta == 0:
                self.record_mean(ctx, fixed=self.fixed_multiplier(ctx.hp, lr0))
                return
            steps = self.read_steps(ctx, lr0)
            self.clamp_start(ctx, steps, delta, lr0)
            self.record_mean(ctx, ctx.temp().copy_(steps), delta)

    def clamp_start(self, ctx, steps: torch.Tensor, delta: float, lr0: float) -> None:
        """At step 1, put the mask (1 at first) within its bounds: with the upstream's absolute ``min_lr`` /
        ``max_lr`` the built-with lr may lie outside them (``max_lr=5e-4`` at lr 1e-3 starts the mask at 0.5)."""
        steps.clamp_(*self.bounds(ctx, delta, lr0))
        self.write_steps(ctx, steps, lr0)
        ctx.touch("lr_mask.steps")

    def bumps(self, ctx, units: int) -> tuple[Any, Any]:
        """Upward and downward steps in lattice steps (ints, or per-tensor int16 vectors in subclasses)."""
        return units, units
