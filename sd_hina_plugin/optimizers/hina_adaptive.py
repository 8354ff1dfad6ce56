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
from ._declare import NotesOnGivenSwitches, config_for
from .adaptive_report import AdaptiveReports
from .hina_adamw import (DYNAMIC_WD, SPD_LAMBDA, TAM_BETA, USE_ADOPT, USE_AGR, USE_CAUTIOUS, USE_GRAMS, USE_ORTHOGRAD,
                         USE_SPD, USE_TAM)

_GRAD_AND_MOMENTS = (
    OrthoGrad(USE_ORTHOGRAD), AGR(USE_AGR),
    AdoptScale(USE_ADOPT), TorqueAwareMomentum(TAM_BETA, USE_TAM), FirstMoment(), SecondMoment(),
    AdamNormalize(USE_ADOPT, switch_on=False), AdoptDirection(USE_ADOPT), Grams(USE_GRAMS), Cautious(USE_CAUTIOUS, yields_to=USE_GRAMS),
)


@register(summary="HinaAdamW techniques + per-tensor importance, relationships and a per-element lr mask")
class AdamW_HinaAdaptive(NotesOnGivenSwitches, AdaptiveReports, HinaOptimizer):  # noqa: N801 - the upstream name
    """HinaAdamW's techniques with per-tensor importance, relationship discovery and a relative lr mask."""

    NAME = "AdamW_HinaAdaptive"
    TECHNIQUES = _GRAD_AND_MOMENTS + (
        LrMask(), AdaptiveImportance(),
        DynamicWeightDecay(DYNAMIC_WD), DecoupledWeightDecay(), SelectiveProjectionDecay(SPD_LAMBDA, USE_SPD), WriteParams(),
    )
    #: use_grams off: the upstream documents no Grams for this optimizer (Cautious, on, is its sign rule), and with it
    #: on the U-Net LoRA task trailed tuned AdamW by 4.5% (sd-hina bench --ablate AdamW_HinaAdaptive; README)
    Config = config_for(NAME, TECHNIQUES, PRECISION_FIELDS, defaults={"optim_bits": 8, "spd_lambda": 0.06, "use_grams": False})


@register(summary="AdamW_HinaAdaptive for bf16 weights: bf16 moments with stochastic rounding, Kahan updates, delayed decay")
class AdamWBF16_HinaAdaptive(NotesOnGivenSwitches, AdaptiveReports, HinaOptimizer):  # noqa: N801 - the upstream name
    """The adaptive optimizer for bf16 parameters: bf16 state written with stochastic rounding, Kahan-compensated
    parameter updates, delayed weight decay."""

    NAME = "AdamWBF16_HinaAdaptive"
    TECHNIQUES = _GRAD_AND_MOMENTS + (
        AdaptiveImportance(),
        DynamicWeightDecay(DYNAMIC_WD), DelayedWeightDecay(), SelectiveProjectionDecay(SPD_LAMBDA, USE_SPD), WriteParams(),
    )
    Config = config_for(NAME, TECHNIQUES, defaults={"lr": 1e-4, "spd_lambda": 0.06, "low_precision_update": "kahan", "use_grams": False})
    PARAM_DTYPES = (torch.bfloat16,)
    OTHER_DTYPES_HINT = "Cast the model with model.to(torch.bfloat16) (kohya: --full_bf16), or use AdamW_HinaAdaptive."

    def slot_policy(self, slot: Slot) -> Slot:
        if slot.quantizable:  # the moments: bf16, every write stochastically rounded
            return dataclasses.replace(slot, quantizable=False, dtype="bf16")
        return slot
