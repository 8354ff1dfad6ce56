"""The context module of Automagic_CameAMP_COptim (seed 001): a contextual lr multiplier from the recent
history of the training signal, kept on the device and fed without a closure.

Every step (``ContextProbe``, before the momentum update) the optimizer sums, over all its tensors,
``<u, m_prev>``, ``|u|^2``, ``|m_prev|^2`` and ``|g|^2`` (u: the normalised gradient, m_prev: the momentum
before this step; a tensor skipped this step, for a missing or non-finite gradient, adds only its |m_prev|^2). After the step (``finish``) the context records

    c_t = <u, m_prev> / (|u| |m_prev|)     gradient consistency in [-1, 1] (0 while m is zero)
    n_t = |g|                              gradient norm

in a ring of ``context_window`` steps. A loss enters the same ring when it is fed: ``optimizer.observe_loss(loss)``
(the kohya integration calls it with the step's loss; a closure's loss is fed too). Then:

* multi-scale momentum: for each horizon h in ``momentum_scales``, an EMA with rate 1/h (bias-corrected) of
  c_t and of the loss. ``C = sum_h w_h EMA_h(c)`` with ``w_h`` proportional to 1/h (the short scales weigh most).
* loss trend (only once two losses were fed): ``r = tanh((L_slow - L_fast) / std_window(L))``, the
  improvement of the fastest loss EMA over the slowest, in units of the loss noise in the window.
* edge case (once the window holds min(window, 10) steps): at least ``edge_threshold`` of the window's
  steps had the gradient against the momentum (c_t < 0: oscillation), or ``n_t`` exceeds the window's mean
  gradient norm by the factor ``1 / (1 - edge_threshold)`` (a spike).
* target multiplier ``2^clamp(C + r, -1, 1)``, halved on an edge case; the multiplier moves toward it by
  ``adaptation_rate`` per step (it starts at 1): ``M <- M + adaptation_rate (target - M)``.

The update of every tensor is multiplied by M (with the lr mask and ALLoRA). All of it is device tensors:
no host sync in ``step()``; ``optimizer.c_optim``'s methods read them when asked (for logging).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import Field
from ..engine.pack import upload
from ..engine.technique import Technique

CONTEXT_WINDOW = Field("context_window", "int", 50, "Steps of history the context keeps (consistency, gradient norms, losses).",
                       low=2, high=1_000_000)
EDGE_THRESHOLD = Field("edge_threshold", "float", 0.9,
                       "Edge case when this fraction of the window's steps oscillated, or the gradient norm exceeds its window mean / (1 - edge_threshold).",
                       low=0.0, high=1.0, low_open=True)
ADAPTATION_RATE = Field("adaptation_rate", "float", 0.1, "Rate at which the lr multiplier moves toward its target each step.",
                        low=0.0, high=1.0, low_open=True)
MOMENTUM_SCALES = Field("momentum_scales", "ints", (1, 5, 20, 100),
                        "Horizons (steps) of the context's multi-scale momenta of gradient consistency and loss.", low=1, high=1_000_000)
#: steps the window must hold before an edge case can be declared (or the whole window, if shorter)
EDGE_MIN_STEPS = 10
_SUMS = "coptim.sums"


class Context:
    """The state behind ``optimizer.c_optim``: device tensors plus two host counters, checkpointed by the
    optimizer's ``state_dict()``."""

    def __init__(self, opt: Any):
        self.opt = opt
        self.t: dict[str, torch.Tensor] = {}
        self.steps = 0      # context updates so far (optimizer steps that reached the momentum)
        self.losses = 0     # losses fed so far
        self._rates_key: tuple | None = None
        self._rates = self._weights = None

    # -- allocation -------------------------------------------------------------------------------------
    def _hp(self) -> dict[str, Any]:
        return self.opt.param_groups[0]

    def _ensure(self, device: torch.device) -> dict[str, torch.Tensor]:
        hp = self._hp()
        window, scales = hp["context_window"], tuple(hp["momentum_scales"])
        t = self.t
        if not t or t["hist"].shape[0] != window or t["ema"].shape[0] != len(scales) or t["hist"].device != device:
            t.update(hist=torch.zeros(window, 3, device=device), loss_ok=torch.zeros(window, device=device),
                     ema=torch.zeros(len(scales), 2, device=device), ema_w=torch.zeros(len(scales), 2, device=device),
                     mult=torch.ones((), device=device), edge=torch.zeros((), device=device),
                     consistency=torch.zeros((), device=device))
            self.steps = self.losses = 0
        key = (scales, str(device))
        if self._rates_key != key:  # built once: a host-to-device copy inside step() would wait for the GPU
            rates = upload([1.0 / h for h in scales], device)
            self._rates, self._weights, self._rates_key = rates, rates / rates.sum(), key
        return t

    def multiplier(self, device: torch.device) -> torch.Tensor:
        return self._ensure(device)["mult"]

    # -- per step ---------------------------------------------------------------------------------------
    def accumulate(self, values: torch.Tensor, pack: Any) -> None:
        """Add one pack's ``(<u, m>, |u|^2, |m|^2, |g|^2)`` to this step's sums."""
        self.opt.add_step_sum(_SUMS, pack, values)

    def update(self) -> None:
        sums = self.opt.step_sum(_SUMS)
        if sums is None:
            return
        hp = self._hp()
        t = self._ensure(sums.device)
        rates, weights = self._rates, self._weights
        window, threshold = hp["context_window"], hp["edge_threshold"]
        dot, uu, mm, gg = sums.unbind(0)
        denom = (uu * mm).sqrt()
        c = torch.where(denom > 0, dot / denom.clamp_min(1e-30), torch.zeros_like(dot))
        n = gg.sqrt()
        index = self.steps % window
        t["hist"][index, 0] = c
        t["hist"][index, 1] = n
        t["hist"][index, 2].zero_()  # not ``= 0.0``: a Python number assigned into a tensor is uploaded first
        t["loss_ok"][index].zero_()
        self.steps += 1
        count = min(self.steps, window)
        recent = t["hist"][:count]
        t["ema"][:, 0].lerp_(c.expand_as(rates), rates)
        t["ema_w"][:, 0].lerp_(torch.ones_like(rates), rates)
        consistency = (weights * t["ema"][:, 0] / t["ema_w"][:, 0].clamp_min(1e-30)).sum()
        signal = consistency + self._loss_trend(t)
        target = torch.exp2(signal.clamp(-1.0, 1.0))
        if count >= min(window, EDGE_MIN_STEPS):
            oscillating = (recent[:, 0] < 0).float().mean() >= threshold
            mean_norm = recent[:, 1].mean()
            spike = n * (1.0 - threshold) > mean_norm if threshold < 1.0 else torch.zeros_like(oscillating)
            edge = oscillating | spike
            t["edge"].copy_(edge)
            target = torch.where(edge, 0.5 * target, target)
        t["mult"].lerp_(target, hp["adaptation_rate"])
        t["consistency"].copy_(recent[:, 0].mean())
        self._publish()

    def _publish(self) -> None:
        """Point the optimizer's stats() entries at the context tensors (read only when logged)."""
        for key, name in (("lr_multiplier", "mult"), ("edge", "edge"), ("consistency", "consistency")):
            self.opt._stats[f"hina/coptim/{key}"] = self.t[name]

    def _loss_trend(self, t: dict[str, torch.Tensor]) -> torch.Tensor | float:
        if self.losses < 2:
            return 0.0
        level = t["ema"][:, 1] / t["ema_w"][:, 1].clamp_min(1e-30)
        scales = list(self._hp()["momentum_scales"])
        fast, slow = level[scales.index(min(scales))], level[scales.index(max(scales))]
        ok = t["loss_ok"]
        k = ok.sum().clamp_min(1.0)
        mean = (t["hist"][:, 2] * ok).sum() / k
        std = (((t["hist"][:, 2] - mean) * ok).square().sum() / k).sqrt()
        return torch.tanh((slow - fast) / std.clamp_min(1e-12 * mean.abs() + 1e-30))

    def observe(self, loss: Any) -> None:
        """Feed the loss of the step just taken (a tensor stays on its device: no sync)."""
        if self.steps == 0 or not self.t:
            return
        t = self.t
        device = t["hist"].device
        value = loss.detach().reshape(()).to(device=device, dtype=torch.float32) if isinstance(loss, torch.Tensor) \
            else torch.tensor(float(loss), device=device)
        ok = torch.isfinite(value)
        value = torch.where(ok, value, torch.zeros_like(value))
        index = (self.steps - 1) % t["hist"].shape[0]
        t["hist"][index, 2] = value
        t["loss_ok"][index] = ok.float()
        rates = self._rates
        weight = rates * ok.float()
        t["ema"][:, 1].lerp_(value.expand_as(rates), weight)
        t["ema_w"][:, 1].lerp_(torch.ones_like(rates), weight)
        self.losses += 1

    # -- reading (host syncs: for logging only) --------------------------------------------------------
    def compute_contextual_lr_multiplier(self) -> float:
        return float(self.t["mult"].item()) if self.t else 1.0

    def detect_edge_case(self) -> bool:
        return bool(self.t["edge"].item()) if self.t else False

    def compute_gradient_consistency(self) -> float:
        """Mean gradient-momentum cosine over the window (0.0 before the first update)."""
        return float(self.t["consistency"].item()) if self.t else 0.0

    def compute_loss_stability(self) -> float:
        """``exp(-std / |mean|)`` of the losses fed within the window (1.0 with fewer than two)."""
        if not self.t or self.losses < 2:
            return 1.0
        ok = self.t["loss_ok"]
        values = self.t["hist"][:, 2][ok > 0]
        if values.numel() < 2:
            return 1.0
        mean, std = values.mean(), values.std(correction=0)
        return float(torch.exp(-std / mean.abs().clamp_min(1e-30)).item())

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "losses": self.losses, "tensors": {k: v.clone() for k, v in self.t.items()}}

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        if not saved or not saved.get("tensors"):
            self.t, self.steps, self.losses = {}, 0, 0
            return
        device = self.opt.param_groups[0]["params"][0].device
        self.t = {k: v.to(device).clone() for k, v in saved["tensors"].items()}
        self.steps, self.losses = int(saved["steps"]), int(saved["losses"])
        self._ensure(device)
        if self.steps:  # keep the stats() entries pointing at the restored tensors
            self._publish()


class ContextProbe(Technique):
    """Stage ``moments``, before the momentum update: this pack's sums for the context."""

    spans_groups = True
    name = "context_probe"
    stage = "moments"
    fields = (CONTEXT_WINDOW, EDGE_THRESHOLD, ADAPTATION_RATE, MOMENTUM_SCALES)
    summary = "COptim: gradient consistency and norm sums, every step, on the device"

    def prepare(self, opt) -> None:
        # the context's tensors are made on the first step, which may upload (later steps never do)
        packs = opt.packs()
        if packs:
            opt.c_optim._ensure(packs[0].device)

    def before_graph(self, ctx) -> None:
        ctx.opt.counted_weights(ctx.pack)  # made eagerly (it may upload), not inside the first graph that needs it

    def run(self, ctx) -> None:
        u, m = ctx.m_in, ctx.state("exp_avg")
        ctx.opt.c_optim.accumulate(ctx.total_dots((u, m), (u, u), (m, m), (ctx.g, ctx.g)), ctx.pack)

    def finish(self, opt) -> None:
        opt.c_optim.update()


class ContextScale(Technique):
    """Stage ``scale``: the update times the contextual lr multiplier."""

    spans_groups = True
    name = "context_scale"
    stage = "scale"
    summary = "COptim: update times the contextual lr multiplier (2^(consistency + loss trend), halved on edge cases, smoothed)"

    def before_graph(self, ctx) -> None:
        # the multiplier taken eagerly: reading the optimizer's param_groups inside a graph makes dynamo guard the
        # group's lr (a graph per value), and the context's tensors are made on first use
        ctx.inputs[self.name] = ctx.opt.c_optim.multiplier(ctx.pack.device)

    def run(self, ctx) -> None:
        multiplier = ctx.inputs[self.name] if ctx.compiling else ctx.opt.c_optim.multiplier(ctx.u.device)
        ctx.u.mul_(multiplier)

