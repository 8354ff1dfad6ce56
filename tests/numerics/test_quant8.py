"""Blockwise 8-bit state: error bound, bitsandbytes-identical blocks, padding."""

from __future__ import annotations

import pytest
import torch

from sd_hina_plugin.engine.pack import Pack
from sd_hina_plugin.numerics import quant8

F = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("signed", [True, False])
def test_roundtrip_within_block_error_bound(signed):
    torch.manual_seed(0)
    x = torch.randn(64 * quant8.BLOCK) * torch.logspace(-6, 2, 64).repeat_interleave(quant8.BLOCK)
    if not signed:
        x = x.abs()
    codes = torch.empty(x.numel(), dtype=torch.uint8)
    absmax = torch.empty(x.numel() // quant8.BLOCK)
    quant8.quantize_(x, codes, absmax, signed)
    # absmax is the block's largest magnitude, so every value maps into [-1, 1] before coding.
    torch.testing.assert_close(absmax, x.view(-1, quant8.BLOCK).abs().amax(1))
    y = quant8.dequantize(codes, absmax, signed)
    bound = quant8.error_bound(absmax, signed).repeat_interleave(quant8.BLOCK)
    # bitsandbytes' kernel picks the nearest code except at near-ties (a few in 10^4 elements), so the error
    # stays within half the widest gap of the map, up to 1 %.
    assert ((x - y).abs() <= bound * 1.01).all()


def test_flat_padded_layout_equals_per_tensor_bitsandbytes_blocks():
    """One quantize call over a padded pack gives each tensor exactly the codes bnb gives it alone."""
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (300, 1000, 256, 5000)]
    pack = Pack(0, torch.device("cpu"), torch.float32, True, params)
    flat = torch.zeros(pack.total)
    for view, p in zip(pack.views(flat), params):
        view.copy_(p.detach())
    codes = torch.empty(pack.total, dtype=torch.uint8)
    absmax = torch.empty(pack.total // quant8.BLOCK)
    quant8.quantize_(flat, codes, absmax, True)
    for view, blocks, p in zip(pack.views(codes), pack.kind_views("blocks", absmax), params):
        ref_codes, ref_state = F.quantize_blockwise(p.detach(), code=quant8.qmap(True, p.device), blocksize=quant8.BLOCK)
        assert torch.equal(view, ref_codes)
        assert torch.equal(blocks, ref_state.absmax)


def test_zero_is_exactly_representable():
    """Padding and fresh state must stay exactly zero through dequantize/requantize."""
    for signed in (True, False):
        assert (quant8.qmap(signed, torch.device("cpu")) == 0).any()
