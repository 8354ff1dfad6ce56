"""Writing fp32 results into bf16 tensors without losing small updates.

* :func:`stochastic_round_` rounds each fp32 value to one of its two bf16 neighbours with probability
  proportional to proximity, so the rounded value is unbiased: E[round(x)] = x. It adds 16 random bits to
  the low half of the fp32 bit pattern and truncates, the construction used by SimpleTuner's AdamWBF16,
  pytorch_optimizer's ``copy_stochastic`` and torchao's ``_fp32_to_bf16_sr``.
* :func:`kahan_add_` adds an fp32 increment to a bf16 tensor and keeps what bf16 could not represent in a
  compensation buffer (Kahan summation; optimi documents it for bf16 training). Lost low bits are carried
  to the next step instead of being rounded away.

Both draw randomness (stochastic rounding only) from an explicit ``torch.Generator`` so that a resumed run
continues bit for bit when the generator state is restored.
"""

from __future__ import annotations

import torch

_LOW16 = 0xFFFF
_HIGH16 = -65536  # 0xFFFF0000 as a signed int32


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator | None = None,
                      scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Write fp32 ``src`` into bf16 ``dst`` with unbiased stochastic rounding. Returns ``dst``.

    ``scratch`` (int32, same numel) avoids allocating the random bits each call.
    """
    if dst.dtype != torch.bfloat16:
        dst.copy_(src)
        return dst
    bits = src.contiguous().view(torch.int32)
    noise = scratch if scratch is not None else torch.empty_like(bits)
    noise.random_(0, 1 << 16, generator=generator)
    noise.add_(bits).bitwise_and_(_HIGH16)
    dst.copy_(noise.view(torch.float32))  # exact: the low 16 bits are zero
    return dst


def kahan_add_(param: torch.Tensor, comp: torch.Tensor, delta: torch.Tensor, work: torch.Tensor | None = None,
               applied: torch.Tensor | None = None) -> None:
    """``param += delta`` for low-precision ``param`` with Kahan compensation ``comp`` (same dtype).

    ``delta`` is fp32. After the call ``param + comp`` equals the exact sum up to ``comp``'s own rounding.
    ``work`` is an optional fp32 scratch of the same size. ``applied``, if given, is the part of ``comp`` (fp32,
    overwritten) that may enter ``param`` now: where it is 0, ``param`` only receives ``delta`` and keeps the
    rest of its compensation (a skipped tensor, ``delta`` 0, then keeps both exactly).
    """
    y = torch.add(delta, comp, out=work) if work is not None else delta + comp.float()
    old = param.float()
    param.copy_(old + (y if applied is None else applied.add_(delta)))
    # comp = y - (new - old): what param does not hold yet of everything added so far.
    comp.copy_(y.sub_(param.float().sub_(old)))
