"""HinaAdamWOptimizer: AdamW with 8-bit state and the switchable techniques of seed 002, LoRA/LoKr aware.

Order of a step (each line a technique in ``techniques/``; a switch turns it off):

    grad       OrthoGrad (use_orthogonal_grad) -> AGR (use_agr)
    moments    ADOPT scale (use_adopt_stability) -> TAM (use_tam, tam_beta) -> m -> v
    direction  Adam normalization (ADOPT off) or u = m (ADOPT on) -> Grams (use_grams) or Cautious (use_cautious)
    scale      LoRA+ ratio and ALoRA-style row scaling (use_alora, alora_ratio)
    apply      dynamic weight decay (dynamic_weight_decay, wd_*) -> decoupled weight decay -> SPD (use_spd, spd_lambda)
               -> parameter write (stochastic rounding / Kahan for bf16 weights)

Cautious and Grams both act on the update components whose sign disagrees with the gradient (Cautious
drops them, Grams flips them), so with both switched on (the seed's defaults) Grams applies; a user who sets
``use_cautious=True`` is told at construction that Cautious is inactive. ``use_grams=False`` turns Cautious on.
"""

from __future__ import annotations

from ..config import Field
from ..engine.base import HinaOptimizer
from ..engine.precision import PRECISION_FIELDS
from ..registry import register
from ..techniques.adam import AdamNormalize, FirstMoment, SecondMoment
from ..techniques.adopt import AdoptDirection, AdoptScale
from ..techniques.agr import AGR
from ..techniques.apply import DecoupledWeightDecay, DynamicWeightDecay, WriteParams
from ..techniques.cautious import Cautious
from ..techniques.grams import Grams
from ..techniques.lora_scales import AloraRowScale, LoraPlusRatio
from ..techniques.orthograd import OrthoGrad
from ..techniques.spd import SelectiveProjectionDecay
from ..techniques.tam import TorqueAwareMomentum
from ._declare import NotesOnGivenSwitches, config_for


def switch(name: str, default: bool, help: str) -> Field:
    return Field(name, "bool", default, help)


USE_SPD = switch("use_spd", True, "Selective Projection Decay toward the initial weights (Tian et al. 2024).")
SPD_LAMBDA = Field("spd_lambda", "float", 0.1, "SPD strength lambda.", low=0.0)
USE_CAUTIOUS = switch("use_cautious", True, "Cautious: drop update components whose sign disagrees with the gradient.")
USE_ORTHOGRAD = switch("use_orthogonal_grad", False, "OrthoGrad: gradient orthogonal to the weights, norm kept.")
USE_ADOPT = switch("use_adopt_stability", True, "ADOPT: normalize by the previous second moment; the first step only initializes it.")
USE_GRAMS = switch("use_grams", True, "Grams: update magnitude from the momentum, sign from the gradient.")
USE_AGR = switch("use_agr", True, "Adaptive Gradient Regularization, per tensor.")
USE_TAM = switch("use_tam", True, "Torque-Aware Momentum: damp gradients that turn against the momentum.")
TAM_BETA = Field("tam_beta", "float", 0.999, "TAM's decay of the gradient-momentum alignment EMA.", low=0.0, high=1.0, high_open=True)
USE_ALORA = switch("use_alora", True, "LoRA-aware lrs: LoRA+ ratio on zero-initialised factors and ALoRA-style row scaling by ||BA||.")
ALORA_RATIO = Field("alora_ratio", "float", 21.0, "LoRA+ ratio eta_B / eta_A for B/up (LoKr w2, LoHa w2_a) factors.", low=0.0)
DYNAMIC_WD = switch("dynamic_weight_decay", True, "Relax adapter factors' weight decay after wd_transition_steps.")


@register(aliases=("CustomAdamWOptimizer", "HinaAdamW", "CustomAdamW"),
          summary="AdamW + 8-bit state + SPD, Cautious, OrthoGrad, ADOPT, Grams, AGR, TAM, LoRA+/ALoRA, dynamic wd")
class HinaAdamWOptimizer(NotesOnGivenSwitches, HinaOptimizer):
    """AdamW with 8-bit blockwise moments and switchable SPD, Cautious, OrthoGrad, ADOPT, Grams, AGR, TAM,
    LoRA+/ALoRA scaling and dynamic weight decay."""

    NAME = "HinaAdamWOptimizer"
    TECHNIQUES = (
        OrthoGrad(USE_ORTHOGRAD), AGR(USE_AGR),
        AdoptScale(USE_ADOPT), TorqueAwareMomentum(TAM_BETA, USE_TAM), FirstMoment(), SecondMoment(),
        AdamNormalize(USE_ADOPT, switch_on=False), AdoptDirection(USE_ADOPT), Grams(USE_GRAMS), Cautious(USE_CAUTIOUS, yields_to=USE_GRAMS),
        LoraPlusRatio(ALORA_RATIO, USE_ALORA), AloraRowScale(USE_ALORA),
        DynamicWeightDecay(DYNAMIC_WD), DecoupledWeightDecay(), SelectiveProjectionDecay(SPD_LAMBDA, USE_SPD), WriteParams(),
    )
    Config = config_for(NAME, TECHNIQUES, PRECISION_FIELDS, defaults={"optim_bits": 8})


def get_custom_adamw_optimizer(params, lr: float = 1e-3, optimizer_kwargs: dict | None = None) -> HinaAdamWOptimizer:
    """The upstream fork's helper: ``HinaAdamWOptimizer(params, lr=lr, **optimizer_kwargs)``."""
    return HinaAdamWOptimizer(params, lr=lr, **(optimizer_kwargs or {}))
