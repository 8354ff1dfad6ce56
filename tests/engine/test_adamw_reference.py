"""HinaAdamWCore against the references it must reproduce.

* optim_bits=32: torch.optim.AdamW, 50 steps, within 1e-6 relative, with several groups, per-group lrs and
  weight decays, and an lr scheduler (group["lr"] is read every step).
* optim_bits=8: bitsandbytes.optim.AdamW8bit with the tolerances of bitsandbytes' own tests/test_optim.py
  (8-bit blockwise Adam: mean |p - p_ref| < 6e-5 and mean relative error < 6e-4; state codes compared
  after dequantization, fewer than 20 elements not close at atol 3e-3 / rtol 1e-3 per check).
"""

from __future__ import annotations

import pytest
import torch

from sd_hina_plugin import HinaAdamWCore
from sd_hina_plugin.numerics import quant8

SHAPES = [(64, 100), (100, 64), (16, 768), (768, 16), (10,), (4, 8, 3, 3), (), (3, 5)]


def _pair(seed=0):
    torch.manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, ref


def _feed(ours, ref):
    for a, b in zip(ours, ref):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), g.clone()


def test_matches_torch_adamw_fp32():
    ours, ref = _pair()
    groups = lambda ps: [{"params": ps[:4], "lr": 3e-3, "weight_decay": 0.1}, {"params": ps[4:], "lr": 1e-2}]
    opt = HinaAdamWCore(groups(ours), lr=1e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.01, foreach=False)
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50) for o in (opt, ref_opt)]
    for _ in range(50):
        _feed(ours, ref)
        opt.step()
        ref_opt.step()
        for s in scheds:
            s.step()
    for a, b in zip(ours, ref):
        rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        assert rel < 1e-6, (tuple(a.shape), rel)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], ref_opt.state[b]["exp_avg_sq"], rtol=1e-6, atol=0)


def test_matches_bitsandbytes_adamw8bit():
    bnb = pytest.importorskip("bitsandbytes")
    ours, ref = _pair(1)
    opt = HinaAdamWCore(ours, lr=1e-3, weight_decay=0.01, optim_bits=8, min_8bit_size=256)
    ref_opt = bnb.optim.AdamW8bit(ref, lr=1e-3, weight_decay=0.01, min_8bit_size=256)
    for step in range(50):
        _feed(ours, ref)
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, ref):
            abs_err = (a - b).abs()
            assert abs_err.mean() < 6e-5
            assert (abs_err / (b.abs() + 1e-8)).mean() < 6e-4
            st, bst = opt.state[a], ref_opt.state[b]
            if "exp_avg.q" in st:
                for slot, (codes, absmax, signed) in {"exp_avg": ("state1", "absmax1", True),
                                                      "exp_avg_sq": ("state2", "absmax2", False)}.items():
                    mine = quant8.dequantize(st[f"{slot}.q"].reshape(-1), st[f"{slot}.absmax"], signed)
                    theirs = quant8.dequantize(bst[codes].reshape(-1), bst[absmax], signed)
                    close = torch.isclose(mine, theirs, atol=3e-3, rtol=1e-3)
                    assert (~close).sum() < 20
            a.data.copy_(b.data)  # bitsandbytes' tests re-sync parameters every step


def test_small_tensors_keep_fp32_state_and_8bit_bytes():
    params = [torch.nn.Parameter(torch.randn(16, 768)) for _ in range(4)] + [torch.nn.Parameter(torch.randn(100))]
    opt = HinaAdamWCore(params, optim_bits=8)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[params[0]]["exp_avg.q"].dtype == torch.uint8
    assert opt.state[params[0]]["exp_avg.absmax"].dtype == torch.float32
    assert opt.state[params[-1]]["exp_avg"].dtype == torch.float32
    big = sum(p.numel() for p in params[:4])
    assert (opt.state_bytes() - 8 * 100) / big <= 2.0 + 8 / 256 + 1e-9


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_bf16_params_keep_fp32_math(optim_bits):
    """Tiny updates reach bf16 weights through stochastic rounding; round-to-nearest loses them."""
    torch.manual_seed(0)
    base = torch.randn(64, 64)
    results = {}
    for rule in ("stochastic", "kahan", "nearest"):
        p = torch.nn.Parameter(base.to(torch.bfloat16))
        opt = HinaAdamWCore([p], lr=1e-4, weight_decay=0.0, optim_bits=optim_bits, min_8bit_size=0, low_precision_update=rule)
        for _ in range(100):
            p.grad = torch.ones_like(p)  # Adam step ~ lr each step, far below bf16's ulp at |p| ~ 1
            opt.step()
        results[rule] = (base - p.float()).mean().item()
    expected = 100 * 1e-4
    assert abs(results["stochastic"] - expected) < 0.1 * expected
    assert abs(results["kahan"] - expected) < 0.1 * expected
    assert results["nearest"] < 0.2 * expected


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_a_tensor_without_gradient_leaves_the_others_as_if_it_were_absent(optim_bits):
    """A step where some tensors of a pack have no gradient (kohya's module dropout) runs the pack without them.
    The others end exactly where an optimizer holding only them ends, 8-bit state included: their padded
    blocks (300 elements in two 256-element blocks) must not see the absent tensors' values or stale padding."""
    torch.manual_seed(0)
    shapes = [(300,), (20, 30), (10,)]
    alone = [torch.nn.Parameter(torch.randn(s)) for s in shapes[:2]]
    mixed = [torch.nn.Parameter(p.detach().clone()) for p in alone] + [torch.nn.Parameter(torch.randn(shapes[2]))]
    kwargs = {"optim_bits": optim_bits, "min_8bit_size": 0, "weight_decay": 0.1}
    opt_alone, opt_mixed = HinaAdamWCore(alone, lr=1e-2, **kwargs), HinaAdamWCore(mixed, lr=1e-2, **kwargs)
    for step in range(8):
        for a, b in zip(alone, mixed):
            g = torch.randn_like(a) * (0.5 ** step)  # falling gradients: a stale larger absmax would show
            a.grad, b.grad = g.clone(), g.clone()
        mixed[2].grad = torch.randn_like(mixed[2]) if step % 3 == 0 else None
        opt_alone.step()
        opt_mixed.step()
    for a, b in zip(alone, mixed):
        assert torch.equal(a, b)
        for key, value in opt_alone.state[a].items():
            assert torch.equal(value, opt_mixed.state[b][key]), key


@pytest.mark.parametrize("rule", ["kahan", "stochastic", "nearest"])
def test_a_skipped_bf16_tensor_keeps_its_value_and_state_under_every_write_rule(rule):
    """A tensor whose gradient is not finite is skipped: its bf16 value and its state stay exactly as they were,
    whatever the write rule. Under Kahan the write must not apply the tensor's pending compensation alone (a
    compensation of exactly half an ulp, which bf16 storage of the compensation produces, would move the value
    by one ulp)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64).bfloat16()) for _ in range(2)]
    opt = HinaAdamWCore(params, lr=1e-3, low_precision_update=rule, weight_decay=0.1)
    skipped = 0
    for step in range(40):
        for p in params:
            p.grad = torch.randn_like(p)
        if step >= 5 and step % 2:
            params[0].grad[0, 0] = float("nan")
            before = params[0].detach().clone()
            state = {k: v.clone() for k, v in opt.state[params[0]].items()}
            opt.step()
            assert torch.equal(params[0], before), step
            comp = opt.state[params[0]].get("kahan_comp")
            assert comp is None or torch.equal(comp, state["kahan_comp"]), step
            skipped += 1
        else:
            opt.step()
    assert skipped == 18
