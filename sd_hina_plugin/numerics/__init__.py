"""Low-precision numerics: blockwise 8-bit state, stochastic rounding, Kahan-compensated updates."""

from .quant8 import BLOCK, bnb_available
from .rounding import kahan_add_, stochastic_round_

__all__ = ["BLOCK", "bnb_available", "kahan_add_", "stochastic_round_"]
