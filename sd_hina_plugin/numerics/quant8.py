"""Blockwise 8-bit optimizer state on top of bitsandbytes' blockwise quantization.

Layout (the same as ``bitsandbytes.optim.AdamW8bit``): each state tensor is split into blocks of
``BLOCK`` = 256 consecutive elements; a block stores one fp32 ``absmax`` and 256 uint8 codes into a
256-entry dynamic map (signed for momenta, unsigned for second moments). Dequantized value =
``code[q] * absmax``. State = 1 byte + 4/256 bytes per element = 2.03 B/param for Adam's two moments.

The engine keeps the codes of all tensors of a pack in one flat buffer whose per-tensor segments are
padded to a multiple of ``BLOCK``, so the blocks are exactly bitsandbytes' per-tensor blocks while one
quantize / dequantize call serves the whole pack (the number of calls does not grow with tensor count).
bitsandbytes runs these kernels on CPU and CUDA.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

BLOCK = 256


@functools.lru_cache(maxsize=None)
def _functional():
    # bitsandbytes logs a warning about optional CPU kernels at import; it is noise for us.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")
        import bitsandbytes.functional as F  # noqa: N812
    finally:
        logging.disable(previous)
    return F


def bnb_available() -> tuple[bool, str]:
    """Whether bitsandbytes' blockwise kernels can run here, and why not if they cannot. Called when an 8-bit
    optimizer is built; it also reads the maps' host constants (:func:`zero_code`, the smallest positive
    codes) then, so that no step has to read them from a tensor."""
    try:
        F = _functional()
        x = torch.linspace(-1, 1, BLOCK)
        q, state = F.quantize_blockwise(x, code=qmap(True, torch.device("cpu")), blocksize=BLOCK)
        F.dequantize_blockwise(q, absmax=state.absmax, code=qmap(True, torch.device("cpu")), blocksize=BLOCK)
        for signed in (True, False):
            zero_code(signed)
            _smallest_positive(signed)
    except Exception as exc:  # pragma: no cover - depends on the installation
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


_QMAPS: dict[tuple[bool, str], torch.Tensor] = {}


def qmap(signed: bool, device: torch.device) -> torch.Tensor:
    """The 256-entry dynamic quantization map bitsandbytes' 8-bit optimizers use (one copy per device)."""
    key = (signed, str(device))
    if key not in _QMAPS:
        _QMAPS[key] = _functional().create_dynamic_map(signed=signed).to(device=device, dtype=torch.float32)
    return _QMAPS[key]


def padded(numel: int) -> int:
    return -(-numel // BLOCK) * BLOCK


def quantize_(src: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> None:
    """Quantize fp32 ``src`` (length a multiple of BLOCK) into preallocated ``codes`` and ``absmax``."""
    _functional().quantize_blockwise(src, code=qmap(signed, src.device), absmax=absmax, out=codes, blocksize=BLOCK)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize ``codes`` to fp32, into ``out`` where the backend supports it, and return the result.

    bitsandbytes' CPU backend has no out-variant, so there the result is a new tensor (freed after the step).
    """
    F = _functional()
    if codes.device.type == "cpu":
        return F.dequantize_blockwise(codes, absmax=absmax, code=qmap(signed, codes.device), blocksize=BLOCK)
    return F.dequantize_blockwise(codes, absmax=absmax, code=qmap(signed, codes.device), out=out, blocksize=BLOCK)


def error_bound(absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """Largest round-to-nearest error per block: half the widest gap of the map, times the block absmax."""
    code = qmap(signed, absmax.device)
    gap = (code[1:] - code[:-1]).abs().max()
    return absmax * gap / 2


def smallest_values(absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """Per element (flat, blocks expanded), the smallest positive magnitude its block can hold: anything
    smaller dequantizes to 0. Dividing by an 8-bit statistic needs this floor (e.g. CAME's unfactored v)."""
    return absmax.repeat_interleave(BLOCK) * _smallest_positive(signed)


_SMALLEST: dict[bool, float] = {}


def _smallest_positive(signed: bool) -> float:
    # a plain dict, filled when an 8-bit optimizer is built (bnb_available): a compiled step reads a constant here,
    # where dynamo would trace through an lru_cache wrapper into the map's tensor
    if signed not in _SMALLEST:
        code = qmap(signed, torch.device("cpu"))
        _SMALLEST[signed] = float(code[code > 0].min())
    return _SMALLEST[signed]


@functools.lru_cache(maxsize=None)
def zero_code(signed: bool) -> int:
    """The code whose value is exactly 0 (fresh and padding elements must hold it: code 0 of the signed map
    is -0.99, which a loaded absmax would turn into a large value)."""
    return int(torch.nonzero(qmap(signed, torch.device("cpu")) == 0)[0, 0])
