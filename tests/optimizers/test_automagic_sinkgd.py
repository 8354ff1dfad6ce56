"""Automagic_Sinkgd against a plain per-tensor reference; SinkGD invariants; phases; full_finetune; resume."""

from __future__ import annotations

import math

import pytest
import torch
from support import lora_problem, roundtrip, step_context, train, trainable

from sd_hina_plugin import Automagic_Sinkgd
from sd_hina_plugin.techniques.sinkgd import SinkgdDirection


def plain_sinkgd(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """The paper's alternating normalisation, written directly: rows to sqrt(n), then columns to sqrt(m)."""
    m, n = x.shape
    for _ in range(iterations):
        x = x * (math.sqrt(n) / (x.norm(dim=1, keepdim=True) + 1e-15))
        x = x * (math.sqrt(m) / (x.norm(dim=0, keepdim=True) + 1e-15))
    return x


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (7, 7), (4, 8 * 9)])
def test_sinkgd_kernel_equals_alternating_normalisation(shape):
    torch.manual_seed(0)
    x = torch.randn(3, *shape) * torch.logspace(-3, 1, shape[1])  # badly scaled columns
    expected = torch.stack([plain_sinkgd(m, 4) for m in x])
    ctx = step_context(list(x))
    u = x.reshape(-1).clone()
    SinkgdDirection.normalize(ctx, u, 4)
    out = u.view_as(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.norm(dim=1), torch.full((3, shape[1]), math.sqrt(shape[0])), rtol=1e-4, atol=1e-4)
    rms = out.pow(2).mean().sqrt().item()
    assert 0.9 < rms < 1.1  # entries of RMS ~1 whatever the gradient scale


def reference_run(named, grads_per_step, hp, lr):
    """The documented step, per tensor, in plain torch (LoRA mode, fp32 mask)."""
    p = {n: t.detach().clone() for n, t in named}
    m = {n: torch.zeros_like(t) for n, t in p.items()}
    mask = {n: torch.ones_like(t) for n, t in p.items()}
    sign = {n: torch.zeros_like(t) for n, t in p.items()}
    theta = {n: 1.0 for n in p}
    W, lr0 = hp["warmup_steps"], lr
    iterations = hp["sinkgd_iters"] or 4
    for t, grads in enumerate(grads_per_step, start=1):
        if t == 1:
            for n in p:
                m[n] = m[n] * hp["beta1"] + (1 - hp["beta1"]) * grads[n]
                sign[n] = torch.sign(grads[n])
            continue
        if (t - 2) % hp["stats_update_freq"] == 0:
            means = torch.stack([grads[n].abs().mean() for n in p])
            z = (means - means.mean()) / (means.std(unbiased=False) + 1e-12)
            theta = {n: (2 * torch.sigmoid(4 * zi)).item() for n, zi in zip(p, z)}
        new_p = {}
        for n in p:
            g, b1 = grads[n], hp["beta1"]
            if hp["sinkgd_momentum"] == "nesterov":  # new momentum first, then b1 m + (1 - b1) g
                m[n] = m[n] * b1 + (1 - b1) * g
                u = b1 * m[n] + (1 - b1) * g
            elif g.dim() >= 2:  # the upstream's Grams-style direction from the previous momentum
                u = m[n].abs() * torch.sign(g + m[n])
            else:
                u = m[n].abs() * torch.sign(g)
            if g.dim() >= 2:
                u = plain_sinkgd(u.reshape(u.shape[0], -1), iterations).reshape(u.shape)
            else:
                u = u * math.sqrt(u.numel()) / (u.norm() + 1e-15)
            if hp["sinkgd_momentum"] == "grams":
                m[n] = m[n] * b1 + (1 - b1) * g
            u = u / (1 + min(3 * (m[n] ** 2).sum().item(), 10))
            if t <= W:
                # absolute lr_bump / min_lr / max_lr where given (the upstream's), else relative to the lr
                bump = hp["lr_bump"] / lr0 if hp["lr_bump"] is not None else hp["lr_mask_bump"]
                lo = hp["min_lr"] / lr0 if hp["min_lr"] is not None else hp["lr_mask_bounds"][0]
                hi = hp["max_lr"] / lr0 if hp["max_lr"] is not None else hp["lr_mask_bounds"][1]
                up = down = bump
                if t < W / 2:
                    c = -(g * p[n]).sum()
                    up, down = (hp["d_coef"] * bump if c > 0 else bump), (hp["d_coef"] * bump if c < 0 else bump)
                current = torch.sign(g)
                mask[n] = (mask[n] + torch.where(current == sign[n], up, -down)).clamp(lo, hi)
                sign[n] = current
            u = u * mask[n]
            rows = p[n].reshape(p[n].shape[0], -1) if p[n].dim() >= 2 else p[n].reshape(-1, 1)
            scale = 1 / torch.sqrt(rows.pow(2).sum(1) + 1 / hp["eta"] ** 2)
            u = (u.reshape(rows.shape[0], -1) * scale[:, None]).reshape(u.shape)
            new_p[n] = p[n] * (1 - lr * hp["weight_decay"] * theta[n]) - lr * u
        p = new_p
    return p


@pytest.mark.parametrize("bounds", [{}, {"lr_bump": 1e-5, "min_lr": 1e-6, "max_lr": 1e-2}, {"lr_mask_bump": 0.25, "lr_mask_bounds": (0.5, 1.5)}],
                         ids=["relative-defaults", "absolute-upstream", "relative-tight"])
@pytest.mark.parametrize("direction", ["nesterov", "grams"])
def test_matches_reference(bounds, direction):
    torch.manual_seed(0)
    named = [("a.lora_down.weight", torch.nn.Parameter(torch.randn(4, 24) * 0.3)),
             ("a.lora_up.weight", torch.nn.Parameter(torch.randn(24, 4) * 0.01)),
             ("conv.lora_down.weight", torch.nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)),
             ("scale", torch.nn.Parameter(torch.ones(10)))]
    bounds = {**bounds, "sinkgd_momentum": direction}
    hp = Automagic_Sinkgd.Config(warmup_steps=6, stats_update_freq=3, weight_decay=0.05, **bounds).as_dict()
    grads = [{n: torch.randn_like(p) * 0.01 for n, p in named} for _ in range(10)]
    start = {n: p.detach().clone() for n, p in named}
    expected = reference_run(named, grads, hp, lr=1e-3)
    opt = Automagic_Sinkgd([p for _, p in named], lr=1e-3, warmup_steps=6, stats_update_freq=3, weight_decay=0.05, **bounds)
    for step in grads:
        for n, p in named:
            p.grad = step[n].clone()
        opt.step()
    for n, p in named:
        # the lr mask is exact (an int16 count of bumps), so the whole step matches the fp32 reference
        moved, ref = p.detach() - start[n], expected[n] - start[n]
        assert ref.abs().mean() > 1e-4  # the reference really moved
        torch.testing.assert_close(moved, ref, rtol=1e-4, atol=1e-4 * ref.abs().mean().item(), msg=n)


@pytest.mark.parametrize("d_coef, units", [(2.0, 1), (1.5, 2), (2.25, 4), (1.3, 10), (1.37, 16)])
def test_prodigy_bumps_are_whole_lattice_steps(d_coef, units):
    from sd_hina_plugin.techniques.sinkgd import ProdigyLrMask
    hp = Automagic_Sinkgd.Config(d_coef=d_coef).as_dict()
    assert ProdigyLrMask().units(hp) == units
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 8))
    opt = Automagic_Sinkgd([p], lr=1e-3, lr_bump=1e-4, d_coef=d_coef, warmup_steps=40, weight_decay=0.0)
    for _ in range(5):
        p.grad = torch.randn_like(p)
        opt.step()
    bump = 1e-4 / 1e-3
    steps = (opt.lr_mask(p) - 1.0) / (bump / units)  # whole lattice steps
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)


def test_phases_first_step_bumps_then_frozen_and_no_hidden_decay():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 16))
    opt = Automagic_Sinkgd([p], lr=1e-3, warmup_steps=4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 if s >= 7 else 1.0)
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    assert torch.equal(p, before)  # first step: no update
    masks, deltas = [], []
    for _ in range(9):
        before = p.detach().clone()
        p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
        masks.append(opt.lr_mask(p).clone())
        deltas.append((p.detach() - before).abs().mean().item())
    assert not torch.equal(masks[0], masks[2])  # learning during warm-up (steps 2..4)
    assert all(torch.equal(masks[2], later) for later in masks[3:])  # frozen after warm-up
    # after warm-up the scheduler alone sets the scale: halving the lr halves the (RMS-normalised) steps
    assert deltas[6] / deltas[4] == pytest.approx(0.5, rel=0.15)


def test_sinkgd_iters_defaults_follow_the_mode():
    from sd_hina_plugin.techniques.sinkgd import sinkgd_iterations

    assert sinkgd_iterations(Automagic_Sinkgd.Config().as_dict()) == 4
    assert sinkgd_iterations(Automagic_Sinkgd.Config(full_finetune=True).as_dict()) == 5
    assert sinkgd_iterations(Automagic_Sinkgd.Config(sinkgd_iters=2).as_dict()) == 2


@pytest.mark.parametrize("full_finetune", [False, True])
@pytest.mark.parametrize("save_at", [1, 3, 7])
def test_resume_in_every_phase(full_finetune, save_at):
    """W = 6: save inside the asymmetric half, the symmetric half, and after warm-up."""
    kwargs = dict(lr=1e-3, warmup_steps=6, full_finetune=full_finetune, orthograd=True, stats_update_freq=2)
    model, data = lora_problem()
    opt = Automagic_Sinkgd(trainable(model), **kwargs)
    train(model, opt, data, save_at)
    saved_model, saved_opt = roundtrip(model.state_dict()), roundtrip(opt.state_dict())
    if full_finetune:
        assert all("sinkgd.anchor" in opt.state[p] for p in trainable(model))
    train(model, opt, data, 5, start=save_at)
    model2, _ = lora_problem()
    model2.load_state_dict(saved_model)
    opt2 = Automagic_Sinkgd(trainable(model2), **kwargs)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, data, 5, start=save_at)
    for p, q in zip(trainable(model), trainable(model2)):
        assert torch.equal(p, q)


def test_full_finetune_prodigy_condition_uses_the_initial_weights():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 16))
    opt = Automagic_Sinkgd([p], lr=1e-3, full_finetune=True, warmup_steps=100)
    p.grad = torch.randn_like(p)
    opt.step()
    anchor = opt.state[p]["sinkgd.anchor"]
    assert anchor.dtype == torch.bfloat16 and torch.equal(anchor, p.detach().to(torch.bfloat16))


def test_avg_lr_stat_is_group_lr_times_mean_mask():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(5))]
    opt = Automagic_Sinkgd(params, lr=1e-3, warmup_steps=4, lr_bump=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 if s >= 6 else 1.0)
    for _ in range(8):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    masks = torch.cat([opt.lr_mask(p).flatten() for p in params])
    expected = opt.param_groups[0]["lr"] * masks.mean().item()
    assert opt.stats()["hina/avg_lr/group0"] == pytest.approx(expected, rel=1e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)  # the scheduler's lr is part of it
