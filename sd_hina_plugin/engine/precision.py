"""Arguments the engine itself reads: how state tensors are stored."""

from __future__ import annotations

from ..config import Field

OPTIM_BITS = Field(
    "optim_bits", "int", 32,
    "Bits per element of quantizable state: 8 = bitsandbytes-style blockwise 8-bit (2.03 B/param for Adam), 32 = fp32.",
    choices=(8, 32))
MIN_8BIT_SIZE = Field(
    "min_8bit_size", "int", 4096,
    "Tensors with fewer elements keep 32-bit state even with optim_bits=8 (as bitsandbytes does).", low=0)

PRECISION_FIELDS = (OPTIM_BITS, MIN_8BIT_SIZE)
