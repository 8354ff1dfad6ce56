"""AdamW_HinaAdaptive and AdamWBF16_HinaAdaptive: HinaAdamW's techniques plus the adaptive layer (seed 003).

AdamW_HinaAdaptive runs HinaAdamWOptimizer's pipeline without its LoRA+/ALoRA scaling (the seed has no
``use_alora``), with the per-element lr mask (``use_lr_mask``) and the per-tensor importance and
relationships of ``techniques/adaptive.py`` in the scale stage.

AdamWBF16_HinaAdaptive is the same for bf16 weights only: every moment is stored in bf16 and written with
unbiased stochastic rounding (a round-to-nearest bf16 EMA with b2 = 0.999 cannot follow falling gradients),
parameters receive Kahan-compensated updates, weight decay is delayed until it exceeds
``decay_threshold``, and Adam's bias correction is applied once. It has no lr mask (the seed's BF16
optimizer has none).
"""

from __future__ import annotations

import dataclasses

import torch

from ..engine.base import HinaOptimizer
from ..engine.precision import PRECISION_FIELDS
from ..engine.technique import Slot
from ..registry import register
from ..techniques.adam import AdamNormalize, FirstMoment, SecondMoment
from ..techniques.adaptive import AdaptiveImportance, LrMask
from ..techniques.adopt import AdoptDirection, AdoptScale
from ..techniques.agr import AGR
from ..techniques.apply import DecoupledWeightDecay, DynamicWeightDecay, WriteParams
from ..techniques.cautious import Cautious
from ..techniques.delayed_decay import DelayedWeightDecay
from ..techniques.grams import Grams
from ..techniques.orthograd import OrthoGrad
from ..techniques.spd import SelectiveProjectionDecay
from ..techniques.tam import TorqueAwareMomentum
from ._declare import config_for
from .hina_adamw import (DYNAMIC_WD, SPD_LAMBDA, TAM_BETA, USE_ADOPT, USE_AGR, USE_CAUTIOUS, USE_GRAMS, USE_ORTHOGRAD,
                         USE_SPD, USE_TAM)

_GRAD_AND_MOMENTS = (
    OrthoGrad(USE_ORTHOGRAD), AGR(USE_AGR),
    AdoptScale(USE_ADOPT), TorqueAwareMomentum(TAM_BETA, USE_TAM), FirstMoment(), SecondMoment(),
    AdamNormalize(USE_ADOPT, switch_on=False), AdoptDirection(USE_ADOPT), Grams(USE_GRAMS), Cautious(USE_CAUTIOUS, yields_to=USE_GRAMS),
)


class _AdaptiveReports:
    """The seed's reporting API of the adaptive optimizers (reads device values: call outside step())."""

    def get_relationship_summary(self) -> dict:
        names, partner, compat = self._per_tensor_table("adapt.partner", "adapt.compat")
        pairs = []
        for i, (j, c) in enumerate(zip(partner, compat)):
            if j > 0 and i < j - 1:
                pairs.append({"a": names[i], "b": names[int(j) - 1], "compatibility": round(c, 4),
                              "kind": "adapter pair" if c == 1.0 else "discovered"})
        return {"total_relationships": len(pairs), "relationships": pairs,
                "discovery_interval": self.param_groups[0]["relationship_discovery_interval"]}

    def get_importance_analysis(self) -> dict:
        names, importance = self._per_tensor_table("adapt.importance")
        if not importance:
            return {"importance_statistics": {}, "high_importance_params": 0, "low_importance_params": 0}
        values = torch.tensor(importance)
        mean = values.mean().item()
        ranked = sorted(zip(importance, names), reverse=True)
        return {
            "importance_statistics": {"mean": mean, "max": values.max().item(), "min": values.min().item(),
                                      "std": values.std(unbiased=False).item()},
            "high_importance_params": int((values > 1.5 * mean).sum()),
            "low_importance_params": int((values < 0.5 * mean).sum()),
            "top": [{"name": n, "importance": v} for v, n in ranked[:5]],
            "bottom": [{"name": n, "importance": v} for v, n in ranked[-5:]],
        }

    def get_buffer_pool_stats(self) -> dict:
        """The reusable scratch buffers the step works in (one set per device, sized to the largest pack)."""
        buffers = self._pool.describe()
        return {"buffers": buffers, "count": len(buffers), "estimated_memory_mb": sum(buffers.values()) / 2**20}

    def clear_buffer_pool(self) -> None:
        """Free the scratch buffers; the next step allocates them again."""
        self._pool.clear()
        for pack in self.packs():
            pack.forget_views()

    def _per_tensor_table(self, *keys: str):
        names, columns = [], [[] for _ in keys]
        for pack in self.packs():
            if keys[0] not in pack.storage:
                continue
            names += [self.lora.name_of.get(id(p), f"param{i}") for i, p in enumerate(pack.params)]
            for column, key in zip(columns, keys):
                column += pack.storage[key].tolist()
        return (names, *columns)

    def stats(self) -> dict:
        out = super().stats()
        for pack in self.packs():
            if "adapt.importance" in pack.storage:
                break
        else:
            return out
        _, importance = self.per_tensor("adapt.importance")
        out["hina/importance/mean"] = importance.mean().item()
        out["hina/importance/min"] = importance.min().item()
        out["hina/importance/max"] = importance.max().item()
        return out


@register(summary="HinaAdamW techniques + per-tensor importance, relationships and a per-element lr mask")
class AdamW_HinaAdaptive(_AdaptiveReports, HinaOptimizer):  # noqa: N801 - the upstream name
    """HinaAdamW's techniques with per-tensor importance, relationship discovery and a relative lr mask."""

    NAME = "AdamW_HinaAdaptive"
    TECHNIQUES = _GRAD_AND_MOMENTS + (
        LrMask(), AdaptiveImportance(),
        DynamicWeightDecay(DYNAMIC_WD), DecoupledWeightDecay(), SelectiveProjectionDecay(SPD_LAMBDA, USE_SPD), WriteParams(),
    )
    Config = config_for(NAME, TECHNIQUES, PRECISION_FIELDS, defaults={"optim_bits": 8, "spd_lambda": 0.06})


@register(summary="AdamW_HinaAdaptive for bf16 weights: bf16 moments with stochastic rounding, Kahan updates, delayed decay")
class AdamWBF16_HinaAdaptive(_AdaptiveReports, HinaOptimizer):  # noqa: N801 - the upstream name
    """The adaptive optimizer for bf16 parameters: bf16 state written with stochastic rounding, Kahan-compensated
    parameter updates, delayed weight decay."""

    NAME = "AdamWBF16_HinaAdaptive"
    TECHNIQUES = _GRAD_AND_MOMENTS + (
        AdaptiveImportance(),
        DynamicWeightDecay(DYNAMIC_WD), DelayedWeightDecay(), SelectiveProjectionDecay(SPD_LAMBDA, USE_SPD), WriteParams(),
    )
    Config = config_for(NAME, TECHNIQUES, defaults={"lr": 1e-4, "spd_lambda": 0.06, "low_precision_update": "kahan"})
    PARAM_DTYPES = (torch.bfloat16,)
    OTHER_DTYPES_HINT = "Cast the model with model.to(torch.bfloat16) (kohya: --full_bf16), or use AdamW_HinaAdaptive."

    def slot_policy(self, slot: Slot) -> Slot:
        if slot.quantizable:  # the moments: bf16, every write stochastically rounded
            return dataclasses.replace(slot, quantizable=False, dtype="bf16")
        return slot
