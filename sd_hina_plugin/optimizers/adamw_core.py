"""HinaAdamWCore: AdamW on the engine, the base HinaAdamWOptimizer's techniques plug into.

With ``optim_bits=32`` it computes what ``torch.optim.AdamW`` computes; with ``optim_bits=8`` it stores m
and v as bitsandbytes does in ``AdamW8bit`` (blockwise 8-bit, tensors under ``min_8bit_size`` in fp32).
bf16 parameters get fp32 math and stochastic rounding (or Kahan, see ``low_precision_update``).
"""

from __future__ import annotations

from ..engine.base import HinaOptimizer
from ..engine.precision import PRECISION_FIELDS
from ..registry import register
from ..techniques.adam import AdamNormalize, FirstMoment, SecondMoment
from ..techniques.apply import DecoupledWeightDecay, WriteParams
from ._declare import config_for


@register(summary="AdamW (decoupled weight decay) with optional 8-bit blockwise state; the core of HinaAdamW")
class HinaAdamWCore(HinaOptimizer):
    """AdamW with optional bitsandbytes-layout 8-bit state, flat multi-tensor step, sync-free."""

    NAME = "HinaAdamWCore"
    TECHNIQUES = (FirstMoment(), SecondMoment(), AdamNormalize(), DecoupledWeightDecay(), WriteParams())
    Config = config_for(NAME, TECHNIQUES, PRECISION_FIELDS)
