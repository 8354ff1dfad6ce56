"""The techniques of the Automagic_CameAMP family (seed 001).

With t the group's step, W = ``warmup_steps``, eps = (e1, e2, e3), betas = (b1, b2, b3), and any tensor
with ndim >= 2 viewed as a matrix G (m x n) (conv kernels included):

CAME (Luo et al., arXiv 2307.02047) with ADOPT's ordering (Taniguchi et al., arXiv 2411.02853):

    t = 1     r = rowmean(G^2 + e1), c = colmean(G^2 + e1)          (initialise only; no update)
    t >= 2    u = G / sqrt(V)   with V_ij = r_i c_j / mean(r)        (the factored v of the previous step)
              u <- u / max(1, RMS(u) / clip_threshold)
              r <- b2 r + (1 - b2) rowmean(G^2 + e1),  c likewise     (after use: ADOPT)
              m <- b1_t m + (1 - b1_t) d_t u                          (momentum, below)
              R = (u - m)^2 + e2,  s_r, s_c: EMAs (b3) of its row / column means
              U = m / (sqrt(S / (1 - b3^(t-1))) + e3)   with S_ij = s_r,i s_c,j / mean(s_r)

1-D tensors keep v and the residual unfactored (one value per element). ``came=False`` drops v: the raw
gradient enters the momentum and the residual (g - m)^2 alone normalises the step (AdaBelief's belief
term, factored like CAME's for matrices).

Momentum: ``b1_t = max(b1 * beta1_decay^t, min(b1, 0.4))`` at every step (the consistency-phenomenon
decay of arXiv 2404.07946). While t < W/2 the input is weighted by Torque-Aware Momentum (arXiv
2412.18790): ``d = (1 + s_hat)/2`` from the EMA of cos(m, u) per tensor, faded linearly to 1 at W/2
(``d_t = 1 - (1 - d)(1 - 2t/W)``), so the hand-over to plain consistency momentum has no jump.

Deviations from CAME, on purpose: the residual EMA is bias-corrected (without it the first ~1/(1-b3)
updates are inflated by 1/sqrt(1 - b3^k), 10x at k = 10 with b3 = 0.999, exactly while the lr mask learns);
e3 guards the final division (the seed's third epsilon; CAME has none there).

Grams blend (arXiv 2412.17107): ``U <- a |U| sign(g) + (1 - a) U`` with ``a = beta1_decay^t`` (pure Grams at
the start, plain CAME later; skipped once a < 1e-6).

AdaDecay (Nakamura & Hong, arXiv 1907.08931), while t < W/2: per element, z = (|g| - mean|g|) / std|g| over
its own tensor (the layer), decay strength ``weight_decay * 2 sigmoid(4 z)``, applied through the same
per-element lr as the update (mask and ALLoRA rows), as ``U <- U + wd * theta_c * p``.

The automagic lr mask (:class:`LatticeLrMask`) and ALLoRA rows follow in the scale stage.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..config import Field
from ..engine.checkpoint import FRAGMENTS
from ..engine.technique import Slot, Technique
from ..numerics.quant8 import smallest_values
from .adaptive import LR_BUMP, MASK_BOUNDS, MASK_BUMP, MAX_LR, MIN_LR, LrMask, lattice_bounds, mask_settings, mask_unit

BETAS = Field("betas", "floats", (0.8, 0.99, 0.999),
              "(b1, b2, b3): momentum, CAME's second moment, the confidence residual.", low=0.0, high=1.0, high_open=True, length=3)
EPS = Field("eps", "floats", (1e-30, 1e-16, 1e-8),
            "(e1, e2, e3): added to g^2 (second moment), to the residual, and to the final denominator.", low=0.0, high=1.0, length=3)
CLIP = Field("clip_threshold", "float", 1.0, "RMS clip of the normalised gradient: u /= max(1, RMS(u) / clip_threshold).",
             low=0.0, low_open=True)
CAME = Field("came", "bool", True, "CAME's factored second moment normalises the gradient; False: the residual alone does (AdaBelief-style).")
BETA1_DECAY = Field("beta1_decay", "float", 0.9995,
                    "Momentum b1_t = max(b1 * beta1_decay^t, 0.4); also the Grams blend weight beta1_decay^t.", low=0.0, high=1.0)
TAM_BETA = Field("tam_beta", "float", 0.9, "Torque-Aware Momentum: EMA decay of cos(m, u) in the first half of warm-up.",
                 low=0.0, high=1.0, high_open=True)
USE_TAM = Field("use_tam", "bool", True, "Torque-Aware Momentum weighting of the momentum's input in the first half of warm-up.")
WARMUP = Field("warmup_steps", "int", 500, "Phases: TAM, OrthoGrad and AdaDecay while t < W/2; the lr mask learns while t <= W.", low=0)
#: weight of the Grams blend below which it is skipped (t > 27,600 steps with beta1_decay = 0.9995)
GRAMS_FLOOR = 1e-6

logger = logging.getLogger("sd_hina_plugin")


def is_matrix(pack) -> bool:
    return pack.params[0].dim() >= 2


def readable(ctx, name: str, value: torch.Tensor, floor: float) -> torch.Tensor:
    """An unfactored statistic for division: at least ``floor`` and, in 8-bit packs, at least the smallest value
    its block can represent (below it an element dequantizes to 0, and g / sqrt(0) would be inf)."""
    if not ctx.pack.quantized:
        return value.clamp_min(floor) if floor > 0 else value
    low = smallest_values(ctx.pack.storage[f"{name}.absmax"], signed=False).clamp_min_(floor)
    return torch.maximum(value, low, out=ctx.scratch(f"{name}.readable"))


class CameSecondMoment(Technique):
    """Stage ``moments``: the normalised gradient ``u`` into ``ctx.m_in`` (or the raw gradient with came=False)."""

    spreads = ("rows", "cols")
    name = "came"
    stage = "moments"
    fields = (BETAS, EPS, CLIP, CAME, WARMUP)
    summary = "CAME: g / sqrt(v_{t-1}) with v factored (rows x columns) for matrices, RMS-clipped; first step initialises"

    def pack_tag(self, opt, hp, p):
        return p.dim() >= 2  # matrices and vectors keep different (factored / full) statistics

    def slots_for(self, hp, pack):
        if not hp["came"]:
            return ()
        if is_matrix(pack):
            return (Slot("exp_avg_sq.row", layout="rows"), Slot("exp_avg_sq.col", layout="cols"))
        return (Slot("exp_avg_sq", quantizable=True, signed=False),)

    def run(self, ctx) -> None:
        hp = ctx.hp
        first = ctx.step == 1  # (the lr mask records the first signs in its ``skipped``)
        if not hp["came"]:
            if first:
                ctx.done = True
            return
        eps1, b2 = hp["eps"][0], hp["betas"][1]
        g = ctx.g
        g2 = torch.mul(g, g, out=ctx.temp())
        x = ctx.moment_input()
        if is_matrix(ctx.pack):  # v = r c^T / mean(r): row means and column means of g^2
            rows, cols = ctx.state("exp_avg_sq.row"), ctx.state("exp_avg_sq.col")
            new_r, new_c = ctx.factored_means(g2, eps1)
            if first:
                rows.copy_(new_r)
                cols.copy_(new_c)
            else:
                fr, fc = ctx.factored_roots(rows, cols)  # 1 / sqrt(v_{t-1}) as row and column factors
                ctx.outer_(x, fr, fc, g)
                rows.lerp_(new_r, 1.0 - b2)
                cols.lerp_(new_c, 1.0 - b2)
                if ctx.pack.pad_index is not None and not ctx.compiling:
                    x.index_fill_(0, ctx.pack.pad_index, 0.0)
        else:
            v = ctx.state("exp_avg_sq")
            g2.add_(eps1)
            if first:
                v.copy_(g2)
            else:
                torch.rsqrt(readable(ctx, "exp_avg_sq", v, eps1), out=x).mul_(g)
                v.lerp_(g2, 1.0 - b2)
            ctx.touch("exp_avg_sq")
        if first:
            ctx.done = True
            return
        rms = ctx.tensor_norm(x) / ctx.numels().sqrt()
        ctx.tensor_scale_(x, 1.0 / (rms / hp["clip_threshold"]).clamp_min_(1.0))
        ctx.m_in = x


class CameMomentum(Technique):
    """Stage ``moments``: consistency momentum with TAM weighting (faded out by W/2)."""

    name = "came_momentum"
    stage = "moments"
    fields = (BETAS, BETA1_DECAY, TAM_BETA, USE_TAM, WARMUP)
    slots = (Slot("exp_avg", quantizable=True, signed=True), Slot("tam.s", per_tensor=True), Slot("tam.w", per_tensor=True))
    summary = "m <- b1_t m + (1 - b1_t) d u, b1_t = max(b1 beta1_decay^t, 0.4); TAM weight d faded to 1 by W/2"

    @staticmethod
    def beta(hp, step: int) -> float:
        b1 = hp["betas"][0]
        return max(b1 * hp["beta1_decay"] ** step, min(b1, 0.4))

    @staticmethod
    def tam_fade(hp, step: int) -> float:
        """How much of TAM's damping is applied at ``step``: 1 - 2t/W, down to 0 at W/2."""
        half = hp["warmup_steps"] / 2
        return max(0.0, 1.0 - step / half) if half > 0 else 0.0

    def scalars(self, hp, step):
        fade = self.tam_fade(hp, step) if hp["use_tam"] else 0.0
        return {"fade": fade, "tam": fade > 0, "rate": 1.0 - self.beta(hp, step)}  # (phases as bools: see DynamicWeightDecay)

    def run(self, ctx) -> None:
        from .tam import torque_weights

        m, x = ctx.state("exp_avg"), ctx.m_in
        values = ctx.scalars[self.name]
        fade, rate = values["fade"], values["rate"]
        if values["tam"]:  # m <- (1 - rate) m + rate d_t x, the per-tensor weight broadcast per shape
            d = torque_weights(ctx, m, x, ctx.hp["tam_beta"]).sub_(1.0).mul_(fade).add_(1.0)
            ctx.tensor_axpy_(m.mul_(1.0 - rate), x, d.mul_(rate))
        elif ctx.compiling:  # lerp's weight would be specialized (a graph per step): the same blend as a multiply-add
            m.add_((x - m) * rate)
        else:
            m.lerp_(x, rate)
        ctx.touch("exp_avg")


class CameConfidence(Technique):
    """Stage ``direction``: ``U = m / (sqrt(S_hat) + e3)`` from the (factored) EMA of the residual ``(u - m)^2``."""

    spreads = ("rows", "cols")
    name = "came_confidence"
    stage = "direction"
    fields = (BETAS, EPS)
    summary = "CAME's confidence: U = m / sqrt(S), S the factored, bias-corrected EMA of (u - m)^2 + e2"

    def slots_for(self, hp, pack):
        if is_matrix(pack):
            return (Slot("exp_avg_res.row", layout="rows"), Slot("exp_avg_res.col", layout="cols"))
        return (Slot("exp_avg_res", quantizable=True, signed=False),)

    def scalars(self, hp, step):
        correction = 1.0 / (1.0 - hp["betas"][2] ** (step - 1)) if step > 1 else 1.0  # residual updates so far: t - 1
        return {"correction": correction, "root_correction": math.sqrt(correction)}

    def run(self, ctx) -> None:
        b3 = ctx.hp["betas"][2]
        eps2, eps3 = ctx.hp["eps"][1], ctx.hp["eps"][2]
        m, u = ctx.state("exp_avg"), ctx.u
        res = torch.sub(ctx.m_in, m, out=ctx.temp()).square_()
        correction = ctx.scalars[self.name]["correction"]
        if is_matrix(ctx.pack):
            rows, cols = ctx.state("exp_avg_res.row"), ctx.state("exp_avg_res.col")
            new_r, new_c = ctx.factored_means(res, eps2)
            rows.lerp_(new_r, 1.0 - b3)
            cols.lerp_(new_c, 1.0 - b3)
            root_r, root_c = ctx.factored_roots(rows, cols, correction, inverse=False)
            # the outer product, then + e3: a three-operand broadcast (addcmul) is 3-4x slower on CPU
            torch.div(m, ctx.outer_(u, root_r, root_c).add_(eps3), out=u)
            if ctx.pack.pad_index is not None and not ctx.compiling:  # (compiled: m is 0 there, so u is too)
                u.index_fill_(0, ctx.pack.pad_index, 0.0)
        else:
            s = ctx.state("exp_avg_res")
            s.lerp_(res.add_(eps2), 1.0 - b3)
            ctx.touch("exp_avg_res")
            torch.sqrt(readable(ctx, "exp_avg_res", s, 0.0), out=u).mul_(ctx.scalars[self.name]["root_correction"]).add_(eps3)
            torch.div(m, u, out=u)


class GramsBlend(Technique):
    name = "grams_blend"
    stage = "direction"
    fields = (BETA1_DECAY,)
    summary = "U <- a |U| sign(g) + (1 - a) U, a = beta1_decay^t"

    def scalars(self, hp, step):
        a = hp["beta1_decay"] ** step
        return {"a": a, "on": a >= GRAMS_FLOOR}  # (the phase as a bool: see DynamicWeightDecay)

    def run(self, ctx) -> None:
        a = ctx.scalars[self.name]["a"]
        if not ctx.scalars[self.name]["on"]:
            return
        # a |U| sign(g) + (1 - a) U = U (1 - a + a sign(U g))
        agree = torch.mul(ctx.u, ctx.g, out=ctx.temp()).sign_()
        ctx.u.mul_(agree.mul_(a).add_(1.0 - a))


class ElementAdaDecay(Technique):
    name = "adadecay"
    stage = "direction"
    fields = (Field("weight_decay", "float", 5e-4, "AdaDecay strength (first half of warm-up): per element wd * 2 sigmoid(4 z).", low=0.0),
              EPS, WARMUP)
    summary = "AdaDecay while t < W/2: per-element decay wd * 2 sigmoid(4 z), z of |g| within its tensor"

    def run(self, ctx) -> None:
        wd = ctx.hp["weight_decay"]
        if not wd or ctx.step >= ctx.hp["warmup_steps"] / 2:
            return
        eps3 = ctx.hp["eps"][2]
        a = torch.abs(ctx.g, out=ctx.temp())
        theta = ctx.params32()
        # mean and variance of |g| per tensor from its sum and sum of squares (torch.std_mean is ~50x slower on CPU)
        n = ctx.numels()
        total, norm = ctx.tensor_reductions(("sum", a), ("norm", a))
        mean = total.div_(n)
        var = norm.square_().div_(n).sub_(mean.square()).clamp_min_(0.0)
        scale = 4.0 / (var.sqrt_() + eps3)  # 4 z = |g| * scale - mean * scale
        shift = mean.mul_(scale)
        if ctx.compiling:  # broadcast by Pack.spread: no in-place writes into slices
            z = a.mul_(ctx.pack.spread(scale)).sub_(ctx.pack.spread(shift)).sigmoid_()
            ctx.u.add_(z * theta * (2.0 * wd))
            return
        for b in ctx.buckets:
            rows, part = b.rows(a), slice(b.first, b.first + b.count)
            # two in-place broadcasts: 3x a broadcast addcmul on CPU
            rows.mul_(scale[part].unsqueeze(1)).sub_(shift[part].unsqueeze(1)).sigmoid_()
            b.rows(ctx.u).addcmul_(rows, b.rows(theta), value=2.0 * wd)


#: the widest code of the lr mask in 8-bit packs: a byte plus eight packed bit planes, every point of the int16
#: lattice the fp32 names' count lives on
MAX_CODE_BITS = 16
#: the widest code whose arithmetic (offsets up to twice the window) stays within int16; wider ones use int32
INT16_CODE_BITS = 14


def plane_name(i: int) -> str:
    """The slot holding bit ``8 + i`` of each element's mask code (one bit per element, packed eight to a byte)."""
    return f"lr_mask.code.bit{8 + i}"


def code_planes(storage) -> int:
    """How many bit planes a pack's storage (or a tensor's state) holds beside ``lr_mask.code``."""
    n = 0
    while plane_name(n) in storage:
        n += 1
    return n


def unpack_bits(packed: torch.Tensor, shifts: torch.Tensor | None = None) -> torch.Tensor:
    """Bits packed eight to a uint8 (element ``8 i + k`` in bit k of byte i) as a bool vector."""
    if shifts is None:
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return packed.reshape(-1).unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1).view(-1).bool()


def unpack_bit_values(packed: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """As :func:`unpack_bits`, as uint8 0 / 1 (to add into integer counts without a bool pass)."""
    return packed.reshape(-1).unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1).view(-1)


class LatticeLrMask(LrMask):
    """The automagic per-element lr multiplier of the CameAMP family (relative to the group's first lr ``lr0``),
    kept exactly as :class:`~sd_hina_plugin.techniques.adaptive.LrMask` keeps it: the integer number of bumps
    ``j``, multiplier ``1 + b j``, ``b = lr_bump / lr0``, with ``j`` clamped to the lattice points within
    ``[min_lr, max_lr] / lr0``. While ``2 <= t <= W`` each element steps +1 where ``g > 0`` agrees with the
    previous step's polarity (the seed's rule), -1 where it flips; after W it is frozen.

    Storage: int16 ``lr_mask.steps`` and an int8 polarity; in 8-bit packs a code of 8 to 16 bits (the uint8
    ``lr_mask.code`` and 0 to 8 packed bit planes, :func:`plane_name`) holding ``(j - j_s) mod 2^bits``, the
    distance from the start value ``j_s`` (1, or the nearest bound when the bounds exclude it), so that the zero
    the storage starts with is the start value. The width is chosen when the state is made
    (:meth:`code_bits`): enough for every point the mask can reach, 10 bits with the default bounds and bump.
    Polarity: packed bits. 1.125 B/param plus 0.125 per plane (1.375 with the defaults).
    """

    fields = (LR_BUMP, MIN_LR, MAX_LR, MASK_BUMP, MASK_BOUNDS, WARMUP)
    summary = "automagic lr mask: exact lattice of +-lr_bump/lr0 steps by gradient-sign agreement while t <= W, frozen after"

    def __init__(self):
        super().__init__(switch=None)

    def slots_for(self, hp, pack):
        if pack.quantized:
            # the planes a pack was made with stay (a hyperparameter changed later cannot ask for storage it lacks)
            planes = code_planes(pack.storage) if "lr_mask.code" in pack.storage else self.code_bits(hp, mask_unit(hp)) - 8
            return (Slot("lr_mask.code", dtype="uint8"), *(Slot(plane_name(i), layout="bits") for i in range(planes)),
                    Slot("lr_mask.polarity", layout="bits"))
        return (Slot("lr_mask.steps", dtype="int16"), Slot("lr_mask.polarity", dtype="int8"))

    @staticmethod
    def lattice(hp, lr0: float) -> tuple[float, int, int]:
        """(b, j_min, j_max): the bump in multiplier units and the lattice bounds from min_lr / max_lr."""
        b, lo, hi = mask_settings(hp, lr0)
        if b == 0:
            return 0.0, 0, 0
        return (b, *lattice_bounds(b, lo, hi))

    def mask_of(self, opt, group, p) -> torch.Tensor:
        state = opt.state[p]
        if "lr_mask.code" not in state:
            return super().mask_of(opt, group, p)
        return self.multiplier(group, self.decode(state, group).float())

    @classmethod
    def reach(cls, hp, lr0: float) -> tuple[int, int, int]:
        """(j_s, lo, hi): the start value and the points within the bounds the mask can reach from it in W steps."""
        _, j_min, j_max = cls.lattice(hp, lr0)
        start = min(max(0, j_min), j_max)
        w = int(hp["warmup_steps"])
        return start, max(j_min, start - w), min(j_max, start + w)

    @classmethod
    def code_bits(cls, hp, lr0: float) -> int:
        """Bits of an 8-bit pack's code that hold every reachable point (8 to :data:`MAX_CODE_BITS`): 9 for the
        upstream's absolute bounds and bump (334 points), 10 for the default relative ones (591 with W = 500,
        991 from W = 900 on), 12 for ``lr_mask_bump=0.001`` with W = 2000. The widest while the unit is unknown
        (a group built with lr 0 and no scheduler's ``initial_lr``)."""
        if lr0 <= 0:
            return MAX_CODE_BITS
        _, lo, hi = cls.reach(hp, lr0)
        return min(max(8, (hi - lo).bit_length()), MAX_CODE_BITS)

    @classmethod
    def frame(cls, hp, lr0: float, bits: int) -> tuple[int, int, int]:
        """(j_s, j_lo, j_hi): the start value and the window of ``2^bits`` lattice points a code is read in: all
        reachable points where they fit (always, for the code :meth:`code_bits` chose), else those around the
        start (half below it, more on one side when the other has fewer: only if the bounds, bump or W were
        widened after the state was made)."""
        if lr0 <= 0:  # no unit yet: the mask has not moved
            return 0, 0, 0
        start, lo, hi = cls.reach(hp, lr0)
        codes = 1 << bits
        if hi - lo >= codes:
            lo = min(max(lo, start - codes // 2), hi - (codes - 1))
            hi = lo + codes - 1
        return start, lo, hi

    @classmethod
    def decode(cls, state, hp, dtype: torch.dtype = torch.int16) -> torch.Tensor:
        """The lattice indices ``j`` (int16, or ``dtype``) of one tensor's mask in an 8-bit pack, from its state
        (``optimizer.state[p]``: ``lr_mask.code`` and the bit planes), shaped as the tensor."""
        code = state["lr_mask.code"]
        n, planes = code.numel(), code_planes(state)
        offset = code.reshape(-1).to(cls._work_dtype(8 + planes, dtype), copy=True)
        for i in range(planes):
            offset.add_(unpack_bits(state[plane_name(i)])[:n], alpha=256 << i)
        return cls._from_offset(offset, hp, mask_unit(hp), 8 + planes).to(dtype).view(code.shape)

    @staticmethod
    def _work_dtype(bits: int, dtype: torch.dtype) -> torch.dtype:
        return torch.int32 if bits > INT16_CODE_BITS else dtype

    @classmethod
    def _from_offset(cls, offset: torch.Tensor, hp, lr0: float, bits: int) -> torch.Tensor:
        """``j`` from ``(j - j_s) mod 2^bits`` (in place): the one point of the window with that offset. (The
        moduli are powers of two: a bitwise and, 20x faster than an integer remainder on CPU.)"""
        start, lo, _ = cls.frame(hp, lr0, bits)
        return offset.add_(start - lo).bitwise_and_((1 << bits) - 1).add_(lo)

    # -- storage of j in 8-bit packs ---------------------------------------------------------------------------
    @staticmethod
    def _planes(ctx) -> int:
        return code_planes(ctx.pack.storage)

    def read_steps(self, ctx, lr0: float) -> torch.Tensor:
        if not ctx.pack.quantized:
            return super().read_steps(ctx, lr0)
        planes = self._planes(ctx)
        offset = ctx.state("lr_mask.code").to(self._work_dtype(8 + planes, ctx.count_dtype), copy=True)
        for i in range(planes):
            offset.add_(unpack_bit_values(ctx.state(plane_name(i)), self._shifts(ctx)), alpha=256 << i)
        return self._from_offset(offset, ctx.hp, lr0, 8 + planes).to(ctx.count_dtype)

    def write_steps(self, ctx, steps: torch.Tensor, lr0: float) -> None:
        if ctx.pack.quantized:
            planes = self._planes(ctx)
            wide = steps.to(self._work_dtype(8 + planes, steps.dtype))  # (steps itself where int16 suffices)
            # (j - j_s) mod 2^bits as a bitwise and: two's complement makes it the non-negative remainder
            offset = torch.sub(wide, self.frame(ctx.hp, lr0, 8 + planes)[0]).bitwise_and_((256 << planes) - 1)
            ctx.state("lr_mask.code").copy_(torch.bitwise_and(offset, 255))
            if planes:
                high = offset.bitwise_right_shift_(8).to(torch.uint8)
                for i in range(planes):
                    self._pack_bits(ctx, torch.bitwise_and(high, 1 << i).bitwise_right_shift_(i), ctx.state(plane_name(i)))

    def bounds(self, ctx, delta: float, lr0: float) -> tuple[int, int]:
        j_min, j_max = super().bounds(ctx, delta, lr0)
        if not ctx.pack.quantized:
            return j_min, j_max
        _, lo, hi = self.frame(ctx.hp, lr0, 8 + self._planes(ctx))
        return max(j_min, lo), min(j_max, hi)

    # -- polarity (g > 0) ----------------------------------------------------------------------------------------
    @staticmethod
    def _positive(ctx) -> torch.Tensor:
        if ctx.compiling:  # 0.0/1.0: inductor 2.13's vectorized C++ cannot compare masks made from different dtypes
            return (ctx.g > 0).to(torch.float32)
        # g > 0 as bool(max(g, 0)): exact (+0 and -0 are False), and on CPU 3x faster than torch.gt, whose
        # fp32-to-bool comparison is not vectorised (0.45 ms per million elements against 0.15)
        relu = torch.clamp_min(ctx.g, 0.0, out=ctx.temp())
        return ctx.temp(0, torch.bool).copy_(relu)

    @staticmethod
    def _shifts(ctx) -> torch.Tensor:
        """0..7 as uint8 on the pack's device, made once per pack (not a host-to-device copy every step)."""
        return ctx.pack.derive("mask_bit_shifts", lambda: torch.arange(8, dtype=torch.uint8, device=ctx.pack.device))

    @classmethod
    def _pack_bits(cls, ctx, bits: torch.Tensor, out: torch.Tensor) -> None:
        shifted = bits.view(-1, 8).to(torch.uint8).bitwise_left_shift_(cls._shifts(ctx))
        torch.sum(shifted, dim=1, dtype=torch.uint8, out=out)

    @classmethod
    def _unpack_bits(cls, ctx, packed: torch.Tensor) -> torch.Tensor:
        return packed.unsqueeze(1).bitwise_right_shift(cls._shifts(ctx)).bitwise_and_(1).view(-1).bool()

    def record(self, ctx, pos: torch.Tensor | None = None) -> None:
        """Store this step's gradient polarity (g > 0)."""
        pos = self._positive(ctx) if pos is None else pos
        if ctx.pack.quantized:
            self._pack_bits(ctx, pos, ctx.state("lr_mask.polarity"))
        else:
            ctx.state("lr_mask.polarity").copy_(pos)

    def agreement(self, ctx) -> torch.Tensor:
        pos = self._positive(ctx)
        stored = ctx.state("lr_mask.polarity")
        if ctx.pack.quantized:
            previous = self._unpack_bits(ctx, stored)
        else:  # int8 0/1
            previous = stored if ctx.compiling else stored.view(torch.bool)
        if ctx.compiling:  # as 0.0/1.0 (see _positive)
            agree = torch.eq(pos, previous.to(pos.dtype))
        else:
            agree = torch.eq(pos, previous, out=ctx.temp(1, torch.bool))
        self.record(ctx, pos)
        return agree


# -- checkpoints saved with 8-bit codes (before the codes held the distance from the start) ----------------------
#: the version of the 8-bit packs' mask codes, recorded in state_dict()["hina"] by the 8-bit names; state dicts
#: without it hold the earlier codes (``j mod 256``)
MASK_CODE_VERSION = 2


def legacy_window_start(hp, lr0: float) -> int:
    """The first point of the 256-point window in which the earlier codes ``j mod 256`` were read
    (``j = ((code - lo) mod 256) + lo``), placed as if the mask started at 1 even where the bounds exclude 1."""
    _, j_min, j_max = LatticeLrMask.lattice(hp, lr0)
    w = int(hp["warmup_steps"])
    lo, hi = max(j_min, -w), min(j_max, w)
    hi = max(hi, lo)
    if hi - lo > 255:
        lo = max(lo, min(-128, hi - 255))
    return lo


def _pack_plane(bits: torch.Tensor, nbytes: int) -> torch.Tensor:
    """0/1 values packed eight to a uint8 (element ``8 i + k`` in bit k of byte i), zero-padded to ``nbytes``."""
    flat = torch.zeros(nbytes * 8, dtype=torch.uint8, device=bits.device)
    flat[:bits.numel()] = bits.reshape(-1).to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return flat.view(-1, 8).bitwise_left_shift_(shifts).sum(dim=1, dtype=torch.uint8)


def _upgrade_entry(entry: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any]:
    code = entry["lr_mask.code"]
    lr0 = mask_unit(dict(hp))  # (a copy: mask_unit may record the unit in the dict it reads)
    bits = LatticeLrMask.code_bits(hp, lr0)  # the planes the loading optimizer makes from the same hyperparameters
    offset = torch.zeros(code.numel(), dtype=torch.int32, device=code.device)
    if lr0 > 0 and LatticeLrMask.lattice(hp, lr0)[0] > 0:
        old_lo = legacy_window_start(hp, lr0)
        j = torch.remainder(code.reshape(-1).to(torch.int32) - old_lo, 256).add_(old_lo)
        _, j_min, j_max = LatticeLrMask.lattice(hp, lr0)
        start, lo, hi = LatticeLrMask.frame(hp, lr0, bits)
        j.clamp_(max(j_min, lo), min(j_max, hi))  # the old window could hold values outside the bounds
        offset = j.sub_(start).remainder_(1 << bits)
    nbytes = entry["lr_mask.polarity"].numel()  # the planes are laid out as the polarity bits are
    out = {**entry, "lr_mask.code": torch.bitwise_and(offset, 255).to(torch.uint8).view(code.shape)}
    for i in range(bits - 8):
        out[plane_name(i)] = _pack_plane(offset.bitwise_right_shift(8 + i).bitwise_and_(1), nbytes)
    return out


def upgrade_mask_codes(state_dict: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """``state_dict`` of an 8-bit CameAMP name saved with the earlier codes (no ``mask_code`` version in its
    ``"hina"`` entry: ``lr_mask.code`` held ``j mod 256``) converted to the current ones: each element keeps the
    lattice point its code was read as, clamped to the bounds (the earlier window, placed as if the mask started
    at 1, could read codes as points outside them). Other state dicts are returned as they are; the one passed in
    is not modified. ``groups``: the loading optimizer's ``param_groups`` (for hyperparameters the saved groups
    lack)."""
    entries, saved_groups, meta = state_dict.get("state"), state_dict.get("param_groups"), state_dict.get("hina")
    if not isinstance(entries, dict) or not isinstance(saved_groups, list) or not isinstance(meta, dict):
        return state_dict
    if meta.get("mask_code") is not None:
        return state_dict

    def old(entry: Any) -> bool:
        return isinstance(entry, dict) and "lr_mask.code" in entry

    def parts(entry: Any) -> list:
        return list(entry[FRAGMENTS].values()) if isinstance(entry, dict) and FRAGMENTS in entry else [entry]

    if not any(old(part) for entry in entries.values() for part in parts(entry)):
        return state_dict
    hp_of: dict[Any, dict[str, Any]] = {}
    for saved, group in zip(saved_groups, groups):
        hp = {**{k: v for k, v in group.items() if k != "params"}, **{k: v for k, v in saved.items() if k != "params"}}
        hp_of.update((sid, hp) for sid in saved.get("params", ()))
    converted: dict[Any, Any] = {}
    for sid, entry in entries.items():
        hp = hp_of.get(sid)
        if hp is not None and isinstance(entry, dict) and FRAGMENTS in entry:
            entry = {**entry, FRAGMENTS: {k: _upgrade_entry(e, hp) if old(e) else e for k, e in entry[FRAGMENTS].items()}}
        elif hp is not None and old(entry):
            entry = _upgrade_entry(entry, hp)
        converted[sid] = entry
    logger.info("lr mask: read the 8-bit packs' mask codes of a checkpoint saved by an earlier version "
                "(each element keeps its value, within the bounds)")
    return {**state_dict, "state": converted, "hina": {**meta, "mask_code": MASK_CODE_VERSION}}
