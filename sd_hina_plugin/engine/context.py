"""The per-pack, per-step view techniques work on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..numerics.rounding import kahan_add_, stochastic_round_

if TYPE_CHECKING:  # pragma: no cover
    from .base import HinaOptimizer
    from .pack import Bucket, Pack


class StepContext:
    """Flat fp32 tensors of one pack for one step.

    ``g``            the gathered gradient (fp32, flat, padding zero)
    ``u``            the update direction techniques build (fp32, flat scratch)
    ``state(name)``  a state slot as an fp32 flat tensor (dequantized for 8-bit packs, written back after)
    ``lr``           the group's learning rate as set by the scheduler (``group["lr"]``)
    ``step``         the group's step count, starting at 1 (host int: phase switches cost no sync)
    ``hp``           the param group dict (hyperparameters, possibly overridden per group)
    ``step_scale``   a host multiplier on ``lr`` (e.g. Adam's bias correction)
    ``lr_scale``     optional flat per-element multiplier on the update (lr masks, LoRA+ ratios)
    """

    def __init__(self, opt: "HinaOptimizer", pack: "Pack", group: dict[str, Any], g: torch.Tensor,
                 states: dict[str, torch.Tensor]):
        self.opt = opt
        self.pack = pack
        self.hp = group
        self.lr = group["lr"]
        self.step: int = group["step"]
        self.g = g
        self._states = states
        self.u: torch.Tensor = opt._scratch("u", pack)
        self.step_scale = 1.0
        self.lr_scale: torch.Tensor | None = None

    @property
    def buckets(self) -> list["Bucket"]:
        return self.pack.buckets

    def state(self, name: str) -> torch.Tensor:
        return self._states[name]

    def scratch(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.opt._scratch(name, self.pack, dtype)

    def stat(self, name: str, value: torch.Tensor | float) -> None:
        """Record a logged scalar (kept on device; read only by ``optimizer.stats()``)."""
        self.opt._stats[name] = value.detach() if isinstance(value, torch.Tensor) else value

    # -- the one place parameters are written -----------------------------------------------------------
    def write_params(self, decay: float, direction: torch.Tensor, alpha: float) -> None:
        """``p <- p * decay + alpha * direction`` for every parameter of the pack.

        fp32 parameters are updated in place with two foreach ops. bf16/fp16 parameters are computed in fp32
        and written back by the group's ``low_precision_update`` rule: unbiased stochastic rounding, Kahan
        compensation (slot ``kahan_comp``) or plain round-to-nearest.
        """
        pack = self.pack
        params = pack.params
        if not pack.low_precision:
            if decay != 1.0:
                torch._foreach_mul_(params, decay)
            torch._foreach_add_(params, pack.views(direction), alpha=alpha)
            return
        p32 = self.scratch("p32")
        torch._foreach_copy_(pack.views(p32), params)
        rule = self.hp.get("low_precision_update", "stochastic")
        low = self.scratch("p_low", pack.dtype)
        if rule == "kahan":
            delta = direction.mul_(alpha)
            if decay != 1.0:
                delta.add_(p32, alpha=decay - 1.0)
            low.copy_(p32)
            kahan_add_(low, pack.storage["kahan_comp"], delta, work=self.scratch("kahan_work"))
        else:
            if decay != 1.0:
                p32.mul_(decay)
            p32.add_(direction, alpha=alpha)
            if rule == "stochastic" and pack.dtype == torch.bfloat16:
                stochastic_round_(low, p32, self.opt._generator(pack.device), scratch=self.scratch("sr_bits", torch.int32))
            else:
                low.copy_(p32)
        torch._foreach_copy_(params, pack.views(low))
