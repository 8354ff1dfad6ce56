"""The Automagic_CameAMP family against a plain per-tensor reference written from the formulas; CAME's factored
second moment; the exact lattice lr mask; phase continuity; 8-bit state size; the COptim context module."""

from __future__ import annotations

import math

import pytest
import torch
from support import lora_problem, roundtrip, step_context, train, trainable

from sd_hina_plugin import (Automagic_CameAMP, Automagic_CameAMP8bit, Automagic_CameAMP_COptim, Automagic_CameAMP_COptim8bit,
                            OptimizerConfig)
from sd_hina_plugin.diagnostics import state_bytes
from sd_hina_plugin.techniques.came import LatticeLrMask

HP = dict(lr_bump=1e-4, min_lr=1e-4, max_lr=1e-2, warmup_steps=8, weight_decay=0.05)
LR = 1e-3


def named_params(seed: int = 0):
    torch.manual_seed(seed)
    return [
        ("lora_unet_a.lora_down.weight", torch.nn.Parameter(0.3 * torch.randn(8, 16))),
        ("lora_unet_a.lora_up.weight", torch.nn.Parameter(0.1 * torch.randn(16, 8))),
        ("lora_unet_conv.lora_down.weight", torch.nn.Parameter(0.2 * torch.randn(4, 6, 3, 3))),
        ("lora_unet_conv.lora_up.weight", torch.nn.Parameter(torch.zeros(8, 4, 1, 1))),
        ("lora_unet_norm.scale", torch.nn.Parameter(1.0 + 0.1 * torch.randn(16))),
    ]


def gradients(params, steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    bias = [torch.randn(p.shape, generator=gen) for p in params]  # a persistent direction plus noise
    return [[(b + 0.7 * torch.randn(p.shape, generator=gen)) * 1e-2 for b, p in zip(bias, params)] for _ in range(steps)]


def reference_run(params, grads, hp, lr):
    """The documented step of Automagic_CameAMP, per tensor, in plain torch."""
    b1, b2, b3 = hp["betas"]
    e1, e2, e3 = hp["eps"]
    W, dec = hp["warmup_steps"], hp["beta1_decay"]
    p = [q.detach().clone() for q in params]
    st = [dict(m=torch.zeros_like(q), s=0.0, w=0.0, j=torch.zeros_like(q), pol=torch.zeros_like(q, dtype=torch.bool)) for q in p]
    b = hp["lr_bump"] / lr
    j_min = math.ceil((hp["min_lr"] / lr - 1) / b - 1e-9)
    j_max = math.floor((hp["max_lr"] / lr - 1) / b + 1e-9)
    for t, step_grads in enumerate(grads, start=1):
        for q, s, g in zip(p, st, step_grads):
            g = g.clone()
            if hp["use_orthogonal_grad"] and t < W / 2 and g.numel() > 1:  # OrthoGrad on the raw gradient, rescaled
                w = q.flatten()
                gf = g.flatten()
                perp = gf - (w @ gf) / (w @ w + 1e-30) * w
                g = (perp * gf.norm() / (perp.norm() + 1e-30)).view_as(g)
            if g.numel() > 1:  # AGR per tensor
                g = g * (1 - g.abs() / g.abs().sum())
            matrix = g.dim() >= 2
            G = g.reshape(g.shape[0], -1) if matrix else g
            if t == 1:
                if matrix:
                    s["vr"], s["vc"] = (G * G + e1).mean(1), (G * G + e1).mean(0)
                else:
                    s["v"] = g * g + e1
                s["pol"] = g > 0
                continue
            if matrix:
                V = s["vr"][:, None] * s["vc"][None, :] / s["vr"].mean()
                u = G / V.sqrt()
                s["vr"] = b2 * s["vr"] + (1 - b2) * (G * G + e1).mean(1)
                s["vc"] = b2 * s["vc"] + (1 - b2) * (G * G + e1).mean(0)
            else:
                u = g / s["v"].sqrt()
                s["v"] = b2 * s["v"] + (1 - b2) * (g * g + e1)
            u = u / max(1.0, (u.pow(2).mean().sqrt() / hp["clip_threshold"]).item())
            m = s["m"].reshape(u.shape)
            beta = max(b1 * dec ** t, min(b1, 0.4))
            fade = max(0.0, 1 - t / (W / 2)) if hp["use_tam"] else 0.0
            x = u
            if fade > 0:  # TAM, faded out by W/2
                den = (m.norm() * u.norm()).item()
                cos = (m * u).sum().item() / den if den > 0 else 1.0
                s["s"] = hp["tam_beta"] * s["s"] + (1 - hp["tam_beta"]) * cos
                s["w"] = hp["tam_beta"] * s["w"] + (1 - hp["tam_beta"])
                d = (1 + s["s"] / s["w"]) / 2
                x = u * (1 - (1 - d) * fade)
            m = beta * m + (1 - beta) * x
            R = (u - m) ** 2
            corr = 1 / (1 - b3 ** (t - 1))
            if matrix:
                s["sr"] = b3 * s.get("sr", torch.zeros(R.shape[0])) + (1 - b3) * (R.mean(1) + e2)
                s["sc"] = b3 * s.get("sc", torch.zeros(R.shape[1])) + (1 - b3) * (R.mean(0) + e2)
                S = s["sr"][:, None] * s["sc"][None, :] / s["sr"].mean() * corr
            else:
                s["r"] = b3 * s.get("r", torch.zeros_like(R)) + (1 - b3) * (R + e2)
                S = s["r"] * corr
            U = (m / (S.sqrt() + e3)).view_as(g)
            s["m"] = m.view_as(g)
            a = dec ** t
            U = a * U.abs() * torch.sign(g) + (1 - a) * U  # Grams blend
            if t < W / 2:  # AdaDecay per element within the tensor
                z = (g.abs() - g.abs().mean()) / (g.abs().std(correction=0) + e3)
                U = U + hp["weight_decay"] * 2 * torch.sigmoid(4 * z) * q
            if t <= W:
                agree = (g > 0) == s["pol"]
                s["j"] = (s["j"] + torch.where(agree, 1.0, -1.0)).clamp(j_min, j_max)
                s["pol"] = g > 0
            U = U * (1 + b * s["j"])
            rows = q.reshape(q.shape[0], -1) if q.dim() >= 2 else q.reshape(-1, 1)
            allora = 1 / (rows.pow(2).sum(1) + 1 / hp["eta"] ** 2).sqrt()
            U = (U.reshape(rows.shape) * allora[:, None]).view_as(q)
            q.sub_(lr * U)
    return p, st


def run(cls, named, grads, **hp):
    params = [p for _, p in named]
    opt = cls(named, lr=LR, **hp)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return opt


@pytest.mark.parametrize("early", [{}, {"use_orthogonal_grad": True, "use_tam": True}], ids=["defaults", "orthograd-tam"])
def test_matches_reference_through_every_phase(early):
    named = named_params()
    params = [p for _, p in named]
    grads = gradients(params, 14)  # W = 8: TAM/OrthoGrad/AdaDecay to t < 4, mask learning to t = 8, frozen after
    hp = OptimizerConfig(**HP, **early).as_dict()
    hp.pop("lr")
    expected, ref_state = reference_run(params, grads, hp, LR)
    opt = run(Automagic_CameAMP, named, grads, **HP, **early)
    for (name, p), want in zip(named, expected):
        torch.testing.assert_close(p.detach(), want, rtol=2e-5, atol=1e-7, msg=name)
    for (name, p), s in zip(named, ref_state):  # the mask is exact: integers
        assert torch.equal(opt.state[p]["lr_mask.steps"].float(), s["j"]), name


def test_eight_bit_and_coptim_follow_the_fp32_algorithm():
    start = [p.detach().clone() for _, p in named_params()]
    grads = gradients(start, 14)
    base = [p.detach().clone() for p in run(Automagic_CameAMP, named_params(), grads, **HP).param_groups[0]["params"]]
    eight = run(Automagic_CameAMP8bit, named_params(), grads, min_8bit_size=0, **HP)
    for p, q, s in zip(eight.param_groups[0]["params"], base, start):
        assert (p.detach() - q).norm() < 0.05 * (q - s).norm()  # 8-bit momentum: close to fp32, not equal
    neutral = dict(adaptation_rate=1e-12)  # a multiplier that cannot move: the base algorithm
    coptim = run(Automagic_CameAMP_COptim, named_params(), grads, **neutral, **HP)
    for p, q in zip(coptim.param_groups[0]["params"], base):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-8)


def _factored(r, c):
    """1 / sqrt(v) of CAME's factored second moment from row statistics ``r`` (k, m) and column statistics ``c``
    (k, n) of k matrices, through the step context's primitives."""
    k, m, n = r.shape[0], r.shape[1], c.shape[1]
    ctx = step_context([torch.zeros(m, n) for _ in range(k)])
    fr, fc = ctx.factored_roots(r.reshape(-1), c.reshape(-1))
    return ctx.outer_(torch.empty(ctx.pack.total), fr, fc).view(k, m, n)


def test_factored_second_moment_is_the_outer_product_of_row_and_column_means():
    torch.manual_seed(0)
    r, c = torch.rand(3, 5) + 0.1, torch.rand(3, 7) + 0.1  # rows, columns of 3 matrices
    V = r[:, :, None] * c[:, None, :] / r.mean(1)[:, None, None]
    torch.testing.assert_close(_factored(r, c), V.rsqrt())
    # for a rank-one g^2 (g_ij = a_i b_j) the factored v is exact: V = g^2
    a, b = torch.rand(5) + 0.5, torch.rand(7) + 0.5
    g2 = (a[:, None] * b[None, :]) ** 2
    torch.testing.assert_close(_factored(g2.mean(1)[None], g2.mean(0)[None])[0], g2.rsqrt(), rtol=1e-5, atol=0)


def test_first_step_only_initialises_and_a_dead_row_stays_finite():
    named = named_params()
    params = [p for _, p in named]
    opt = Automagic_CameAMP(named, lr=LR, weight_decay=0.0, warmup_steps=0)  # no OrthoGrad: it would mix rows
    before = [p.detach().clone() for p in params]
    for step in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        params[1].grad[3].zero_()  # a row that never gets a gradient
        opt.step()
        if step == 0:
            assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.isfinite(p).all() for p in params)
    assert torch.equal(params[1][3], before[1][3]) and not torch.equal(params[1], before[1])


@pytest.mark.parametrize("quantized", [False, True])
def test_lattice_mask_is_exact_and_relative_to_the_scheduler(quantized):
    """Every bump lands (a bf16 or blockwise-8-bit mask would round 1e-3 steps on values near 1 away), the mask
    is 1 + b * (agreements - disagreements) within the bounds, and it multiplies the scheduler's lr."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(512))
    cls = Automagic_CameAMP8bit if quantized else Automagic_CameAMP
    extra = {"min_8bit_size": 0} if quantized else {}
    opt = cls([p], lr=1e-2, lr_bump=1e-5, min_lr=1e-4, max_lr=2e-2, warmup_steps=20, weight_decay=0.0, **extra)
    signs = torch.sign(torch.randn(30, 512))
    signs[:, :8] = 1.0  # always agreeing: reach the upper bound (2x) only if no bump is lost? 19 bumps of 1e-3
    count = torch.zeros(512)
    previous = signs[0] > 0
    for t in range(30):
        p.grad = signs[t] * (1e-3 + torch.rand(512) * 1e-3)
        opt.step()
        if 2 <= t + 1 <= 20:
            now = signs[t] > 0
            count += torch.where(now == previous, 1.0, -1.0)
        previous = signs[t] > 0
    b = 1e-3
    expected = 1.0 + b * count.clamp(math.ceil((1e-2 - 1) / b - 1e-9), math.floor((2.0 - 1) / b + 1e-9))
    j = LatticeLrMask.decode(opt.state[p], opt.param_groups[0]) if quantized else opt.state[p]["lr_mask.steps"].float()
    torch.testing.assert_close(1.0 + b * j.float(), expected, rtol=0, atol=1e-6)
    assert (expected[:8] == 1.0 + 19 * b).all()
    # relative: a twin optimizer with the same history, at half the scheduler's lr, moves the weight half as far
    twin_p = torch.nn.Parameter(p.detach().clone())
    twin = cls([twin_p], lr=1e-2, lr_bump=1e-5, min_lr=1e-4, max_lr=2e-2, warmup_steps=20, weight_decay=0.0, **extra)
    twin.load_state_dict(opt.state_dict())
    twin.param_groups[0]["lr"] = 5e-3
    moves = []
    for q, o in ((p, opt), (twin_p, twin)):
        before = q.detach().clone()
        q.grad = signs[0] * 1e-3
        o.step()
        moves.append((q.detach() - before).abs().sum())
    assert (moves[1] / moves[0]).item() == pytest.approx(0.5, rel=1e-5)


def test_lattice_code_holds_the_reachable_range():
    """The 8-bit packs' code is as wide as the points the mask can reach from its start within the bounds in W
    steps (the start included when the bounds exclude 1), and is read in a window holding all of them."""
    hp = OptimizerConfig(lr_bump=3e-6, min_lr=1e-7, max_lr=1e-3, warmup_steps=500).as_dict()
    _, j_min, j_max = LatticeLrMask.lattice(hp, 1e-4)
    assert (j_min, j_max) == (-33, 300) and LatticeLrMask.reach(hp, 1e-4) == (0, -33, 300)
    assert LatticeLrMask.code_bits(hp, 1e-4) == 9 and LatticeLrMask.frame(hp, 1e-4, 9) == (0, -33, 300)
    hp["warmup_steps"] = 100  # the mask moves at most W steps
    assert LatticeLrMask.reach(hp, 1e-4) == (0, -33, 100) and LatticeLrMask.code_bits(hp, 1e-4) == 8
    # at lr 3e-3 the bounds exclude 1: the mask starts at max_lr / lr (j = -667) and can only go down
    hp["warmup_steps"] = 500
    assert LatticeLrMask.lattice(hp, 3e-3)[1:] == (-999, -667) and LatticeLrMask.reach(hp, 3e-3) == (-667, -999, -667)
    # the default relative bounds: 0.1x to 6x with W = 500, all 991 points from 0.1x to 10x from W = 900 on
    default = OptimizerConfig().as_dict()
    assert LatticeLrMask.reach(default, 1e-4) == (0, -90, 500) and LatticeLrMask.code_bits(default, 1e-4) == 10
    default["warmup_steps"] = 5000
    assert LatticeLrMask.reach(default, 1e-4) == (0, -90, 900) and LatticeLrMask.code_bits(default, 1e-4) == 10
    # a finer bump: wider codes, up to 16 bits (the whole int16 lattice of the fp32 names)
    fine = OptimizerConfig(lr_mask_bump=0.001, warmup_steps=2000).as_dict()
    assert LatticeLrMask.code_bits(fine, 1e-4) == 12 and LatticeLrMask.frame(fine, 1e-4, 12) == (0, -900, 2000)
    finer = OptimizerConfig(lr_mask_bump=1e-4, warmup_steps=20000).as_dict()
    assert LatticeLrMask.code_bits(finer, 1e-4) == 15 and LatticeLrMask.frame(finer, 1e-4, 15) == (0, -9000, 20000)
    finest = OptimizerConfig(lr_mask_bump=1e-5, warmup_steps=40000).as_dict()
    assert LatticeLrMask.code_bits(finest, 1e-4) == 16 and LatticeLrMask.frame(finest, 1e-4, 16) == (0, -32767, 32767)
    # a code narrower than the reach (bounds or W widened after the state was made): the points around the start
    assert LatticeLrMask.frame(finer, 1e-4, 10) == (0, -512, 511)


def test_tam_hands_over_without_a_jump_in_update_scale():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 64) * 0.1)
    opt = Automagic_CameAMP([p], lr=1e-3, warmup_steps=40, weight_decay=0.0, use_tam=True)
    direction = torch.randn(32, 64)
    sizes = []
    for t in range(1, 31):
        p.grad = (direction + 3.0 * torch.randn(32, 64)) * 1e-2  # noisy: TAM damps, d well below 1
        before = p.detach().clone()
        opt.step()
        sizes.append((p.detach() - before).norm().item())
    across = sizes[20] / sizes[18]  # steps 21 and 19 straddle W/2 = 20
    assert 0.85 < across < 1.18, sizes[15:25]


def test_state_bytes_per_parameter_on_the_lora_set():
    shapes = [(16, 768), (768, 16)] * 8
    for cls, limit in ((Automagic_CameAMP, 9.0), (Automagic_CameAMP_COptim, 9.0), (Automagic_CameAMP8bit, 3.0),
                       (Automagic_CameAMP_COptim8bit, 3.0)):
        params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
        opt = cls(params, lr=1e-4)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            opt.step()
        per_param = state_bytes(opt) / sum(p.numel() for p in params)
        assert per_param <= limit, (cls.NAME, per_param)
        if "8bit" in cls.NAME:
            kinds = {k: v.dtype for k, v in opt.state[params[0]].items()}
            assert kinds["exp_avg.q"] == torch.uint8 and kinds["lr_mask.code"] == torch.uint8
            assert "lr_mask.code.bit10" not in kinds  # 10 bits with the default bounds and W
            for plane in ("lr_mask.code.bit8", "lr_mask.code.bit9"):  # the code's bits 8 and 9, packed
                assert kinds[plane] == torch.uint8 and opt.state[params[0]][plane].numel() * 8 == params[0].numel()
            assert kinds["lr_mask.polarity"] == torch.uint8 and opt.state[params[0]]["lr_mask.polarity"].numel() * 8 == params[0].numel()


# -- COptim ----------------------------------------------------------------------------------------------------

def coptim_run(feed_loss: bool = True, steps: int = 40, **kwargs):
    model, data = lora_problem()
    # the upstream's early phase (OrthoGrad, TAM) on: its oscillations are what edge_threshold must tell apart
    opt = Automagic_CameAMP_COptim(trainable(model), lr=1e-3, **{"use_orthogonal_grad": True, "use_tam": True, **kwargs})
    multipliers = []
    for i in range(steps):
        x, y = data[i % len(data)]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if feed_loss:
            opt.observe_loss(loss)
        multipliers.append(opt.c_optim.compute_contextual_lr_multiplier())
    return opt, multipliers


def test_context_methods_return_python_values_and_reach_stats():
    opt, mults = coptim_run()
    c = opt.c_optim
    assert isinstance(c.compute_contextual_lr_multiplier(), float)
    assert isinstance(c.detect_edge_case(), bool)
    assert isinstance(c.compute_gradient_consistency(), float) and -1.0 <= c.compute_gradient_consistency() <= 1.0
    assert isinstance(c.compute_loss_stability(), float)
    stats = opt.stats()
    assert stats["hina/coptim/lr_multiplier"] == pytest.approx(mults[-1])
    assert stats["hina/coptim/edge"] in (0.0, 1.0) and "hina/coptim/consistency" in stats
    assert len(set(round(m, 6) for m in mults)) > 10  # it moves


def test_context_works_without_a_loss_and_uses_the_loss_when_fed():
    _, without = coptim_run(feed_loss=False)
    _, with_loss = coptim_run(feed_loss=True)
    assert without[-1] != 1.0  # gradient statistics alone drive it (kohya without logging)
    assert with_loss != without


@pytest.mark.parametrize("argument, values", [
    ("context_window", (4, 50)), ("edge_threshold", (0.3, 0.95)), ("adaptation_rate", (0.02, 0.5)),
    ("momentum_scales", ((1, 5, 20, 100), (1, 2))),
])
def test_every_context_argument_has_an_effect(argument, values):
    results = [coptim_run(**{argument: v})[1] for v in values]
    assert max(abs(a - b) for a, b in zip(*results)) > 1e-3, argument


def test_edge_case_on_oscillation_and_not_on_consistent_gradients():
    def drive(flip: bool):
        p = torch.nn.Parameter(torch.randn(16, 32))
        opt = Automagic_CameAMP_COptim([p], lr=1e-3, context_window=12, edge_threshold=0.6, warmup_steps=0)
        g = torch.randn(16, 32)
        for t in range(30):
            p.grad = (g * (-1) ** t if flip else g) + 0.05 * torch.randn(16, 32)
            opt.step()
        return opt.c_optim
    assert drive(flip=True).detect_edge_case()
    assert drive(flip=False).detect_edge_case() is False
    assert drive(flip=False).compute_gradient_consistency() > 0.5


def test_closure_loss_is_fed():
    model, data = lora_problem()
    opt = Automagic_CameAMP_COptim(trainable(model), lr=1e-3)
    x, y = data[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    assert opt.c_optim.losses == 2  # the first step only initialises (nothing to attach the loss to yet)


# -- resume ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Automagic_CameAMP, Automagic_CameAMP_COptim8bit], ids=lambda c: c.NAME)
@pytest.mark.parametrize("save_at", [3, 6, 10])  # W = 8: TAM phase, mask learning, frozen
def test_resume_in_every_phase(cls, save_at):
    kwargs = dict(warmup_steps=8, min_8bit_size=0) if "8bit" in cls.NAME else dict(warmup_steps=8)
    model, data = lora_problem()
    opt = cls(trainable(model), lr=1e-3, **kwargs)
    train(model, opt, data, save_at)
    saved_model, saved_opt = roundtrip(model.state_dict()), roundtrip(opt.state_dict())
    train(model, opt, data, 6, start=save_at)
    model2, _ = lora_problem()
    model2.load_state_dict(saved_model)
    opt2 = cls(trainable(model2), lr=1e-3, **kwargs)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, data, 6, start=save_at)
    for p, q in zip(trainable(model), trainable(model2)):
        assert torch.equal(p, q)


def test_orthograd_with_a_gradient_parallel_to_the_weights_stays_bounded():
    """The Rosenbrock valley made the gradient parallel to the weights: a rescale derived from dot products
    cancelled to ~0 there and blew the rounding noise of g_perp up to inf (regression)."""
    p = torch.nn.Parameter(torch.tensor([-1.41, 1.99]))
    opt = Automagic_CameAMP([p], lr=1e-3, use_orthogonal_grad=True)
    start = p.detach().clone()
    for _ in range(60):
        p.grad = 3.0 * p.detach() + torch.tensor([1e-7, -1e-7])
        opt.step()
    assert torch.isfinite(p).all() and (p.detach() - start).abs().max() < 0.1


def test_came_false_drops_the_second_moment_and_still_trains():
    """came=False: no v (no exp_avg_sq slots); the raw gradient enters the momentum and the confidence
    residual alone normalises the step, so the update stays O(1) whatever the gradient scale."""
    for scale in (1e-4, 1e2):
        model, data = lora_problem()
        params = trainable(model)
        opt = Automagic_CameAMP(params, lr=1e-3, came=False)
        assert not any(k.startswith("exp_avg_sq") for p in params for k in opt.state[p])  # state made lazily
        start = [p.detach().clone() for p in params]
        for i in range(30):
            x, y = data[i % len(data)]
            opt.zero_grad(set_to_none=True)
            (scale * torch.nn.functional.mse_loss(model(x), y)).backward()
            opt.step()
        assert not any(k.startswith("exp_avg_sq") for p in params for k in opt.state[p])
        step_rms = torch.cat([(p.detach() - s).flatten() for p, s in zip(params, start)]).pow(2).mean().sqrt().item()
        assert 1e-4 < step_rms / (30 * 1e-3) < 10, (scale, step_rms)  # scale-free, like the came=True path


def test_full_finetune_drops_allora():
    named = named_params()
    grads = gradients([p for _, p in named], 6)
    lora_mode = run(Automagic_CameAMP, named_params(), grads, **HP)
    full = run(Automagic_CameAMP, named_params(), grads, full_finetune=True, **HP)
    assert "allora_rows" in [t.name for t in lora_mode.techniques(lora_mode.param_groups[0])]
    assert "allora_rows" not in [t.name for t in full.techniques(full.param_groups[0])]
    zero_b = 3  # the zero-initialised conv up factor: ALLoRA moves its zero rows eta = 2 times faster
    moved = [(o.param_groups[0]["params"][zero_b].detach().abs().mean()).item() for o in (lora_mode, full)]
    assert moved[0] == pytest.approx(2.0 * moved[1], rel=0.05)
