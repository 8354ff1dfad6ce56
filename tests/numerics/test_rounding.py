"""Stochastic rounding to bf16 and Kahan-compensated bf16 accumulation."""

from __future__ import annotations

import torch

from sd_hina_plugin.numerics import kahan_add_, stochastic_round_


def _bf16_neighbours(x: torch.Tensor):
    down = x.to(torch.bfloat16)  # round to nearest, then pick the bracketing pair
    down = torch.where(down.float() > x, torch.nextafter(down, torch.tensor(-float("inf"), dtype=torch.bfloat16)), down)
    up = torch.nextafter(down, torch.tensor(float("inf"), dtype=torch.bfloat16))
    return down.float(), up.float()


def test_stochastic_rounding_is_unbiased_and_picks_neighbours():
    torch.manual_seed(0)
    values = torch.randn(32) * torch.logspace(-3, 3, 32)
    samples = 20000
    x = values.repeat(samples)
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x, torch.Generator().manual_seed(0))
    down, up = _bf16_neighbours(x)
    assert ((out.float() == down) | (out.float() == up)).all()
    # E[round(x)] = x: the probability of rounding up is (x - down) / (up - down).
    p_up = ((x - down) / (up - down)).view(samples, 32)[0]
    observed = (out.float() == up).float().view(samples, 32).mean(0)
    sigma = (p_up * (1 - p_up) / samples).sqrt()
    assert ((observed - p_up).abs() <= 5 * sigma + 1e-4).all()
    mean = out.float().view(samples, 32).mean(0)
    gap = (up - down).view(samples, 32)[0]
    assert ((mean - values).abs() <= 5 * gap * sigma.clamp_min(1e-3)).all()


def test_exactly_representable_values_are_kept():
    x = torch.tensor([1.0, -2.5, 0.0, 2.0 ** 127, -(2.0 ** -120), float("inf")])
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x, torch.Generator().manual_seed(1))
    assert torch.equal(out.float(), x.to(torch.bfloat16).float())


def test_kahan_sum_tracks_fp32_where_plain_bf16_stalls():
    steps, delta = 2000, 1e-4
    p = torch.ones(64, dtype=torch.bfloat16)
    comp = torch.zeros_like(p)
    plain = torch.ones(64, dtype=torch.bfloat16)
    exact = torch.ones(64, dtype=torch.float64)
    for _ in range(steps):
        kahan_add_(p, comp, torch.full((64,), delta))
        plain += delta
        exact += delta
    err_kahan = (p.double() + comp.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    total = steps * delta
    assert err_plain > 0.95 * total  # every increment is below half an ulp of 1.0: plain bf16 never moves
    # The compensation buffer is bf16 too (2 B/param, as in optimi), so it keeps what rounding dropped only to
    # its own 8-bit precision: a few percent of the accumulated change instead of all of it.
    assert err_kahan < 0.05 * total
