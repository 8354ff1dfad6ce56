"""The lr masks in the runs users make: warm-up schedulers that start at lr 0, the first step's signs, ADOPT's
clip schedule, float64 weights, and the strength of the importance scaling."""

from __future__ import annotations

import pytest
import torch
from support import roundtrip

import sd_hina_plugin
from sd_hina_plugin import AdamW_HinaAdaptive, Automagic_CameAMP, Automagic_Sinkgd
from sd_hina_plugin.techniques.came import LatticeLrMask

MASKED = [(Automagic_CameAMP, {}), (Automagic_Sinkgd, {}), (AdamW_HinaAdaptive, {"optim_bits": 32}),
          (AdamW_HinaAdaptive, {"optim_bits": 32, "use_adopt_stability": False})]
MASKED_IDS = ["CameAMP", "Sinkgd", "HinaAdaptive", "HinaAdaptive-noADOPT"]


def _warmup_run(cls, extra, steps=60, warmup=100, lr=1e-4):
    """Same-sign gradients under a LambdaLR linear warm-up from 0 (kohya's --lr_warmup_steps)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(256) * 0.1)
    opt = cls([p], lr=lr, min_lr=1e-6, max_lr=1e-3, lr_bump=1e-5, warmup_steps=500, weight_decay=0.0, **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / warmup))
    for _ in range(steps):
        p.grad = torch.full_like(p, 0.01)
        opt.step()
        sched.step()
    return opt, p


@pytest.mark.parametrize("cls, extra", MASKED, ids=MASKED_IDS)
def test_mask_unit_is_the_built_with_lr_under_a_warmup_from_zero(cls, extra):
    opt, p = _warmup_run(cls, extra)
    group = opt.param_groups[0]
    assert group["hina_lr0"] == group["initial_lr"] == 1e-4
    mask = opt.lr_mask(p)
    # max_lr / lr = 10 is the largest multiplier; the unit taken from a warm-up's transient lr gave 100-352
    assert mask.max().item() <= 10.0 + 1e-5, mask.max().item()
    # same-sign gradients: every element rose by one bump (1e-5 / 1e-4) per step after the first
    assert mask.min().item() > 1.0 + 0.1 * 50


def test_mask_of_a_group_built_with_lr_zero_takes_the_first_positive_lr():
    p = torch.nn.Parameter(torch.zeros(16))
    opt = AdamW_HinaAdaptive([p], lr=0.0, optim_bits=32, use_adopt_stability=False, lr_bump=1e-5)
    p.grad = torch.ones(16)
    opt.step()  # lr 0: nothing moves, and the unit is still unknown
    torch.testing.assert_close(opt.lr_mask(p), torch.ones(16))  # no unit yet: 1, no ZeroDivisionError
    for g in opt.param_groups:
        g["lr"] = 1e-4
    for _ in range(3):
        p.grad = torch.ones(16)
        opt.step()
    assert opt.param_groups[0]["hina_lr0"] == 1e-4
    assert opt.lr_mask(p).min().item() > 1.0


@pytest.mark.parametrize("cls, extra", MASKED, ids=MASKED_IDS)
def test_first_step_signs_are_recorded(cls, extra):
    """A constant-sign gradient raises the mask by one bump at step 2 (AdamW_HinaAdaptive once skipped the
    record behind ADOPT's first step, so step 2 counted every element as a flip: 1.0, 0.9, 1.0, 1.1), and on
    (CameAMP's early OrthoGrad changes later gradients' signs, so its sequence is checked to step 2)."""
    p = torch.nn.Parameter(torch.zeros(32))
    opt = cls([p], lr=1e-3, lr_bump=1e-4, min_lr=1e-5, max_lr=1e-1, warmup_steps=100, weight_decay=0.0,
              **({"d_coef": 1.0} if cls is Automagic_Sinkgd else {}), **extra)
    seen = []
    for _ in range(4):
        p.grad = torch.full_like(p, 0.5)
        opt.step()
        seen.append(opt.lr_mask(p).mean().item())
    expected = [1.0, 1.1] if cls is Automagic_CameAMP else [1.0, 1.1, 1.2, 1.3]
    assert seen[:len(expected)] == pytest.approx(expected, abs=1e-6)


def test_adopt_clip_is_one_at_the_first_update():
    """ADOPT's clip c_k = k^(1/4) with k = 1 at the first update (step 2): a normalised gradient of 3 is cut to 1."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = AdamW_HinaAdaptive([p], lr=1.0, optim_bits=32, weight_decay=0.0, betas=(0.0, 0.999), use_lr_mask=False,
                             use_dynamic_adaptation=False, use_spd=False, use_cautious=False, use_grams=False,
                             use_agr=False, use_tam=False, use_orthogonal_grad=False, dynamic_weight_decay=False)
    p.grad = torch.ones(4)
    opt.step()  # v <- 1, no update
    p.grad = torch.full((4,), 3.0)
    opt.step()  # x = 3 / sqrt(1) = 3, clipped to 1^(1/4) = 1; m = x (b1 = 0); p -= 1 * 1
    torch.testing.assert_close(p.detach(), torch.full((4,), -1.0))
    p.grad = torch.full((4,), 300.0)
    opt.step()  # k = 2: clip 2^(1/4)
    torch.testing.assert_close(p.detach(), torch.full((4,), -1.0 - 2 ** 0.25))


@pytest.mark.parametrize("name", ["Automagic_Sinkgd", "HinaAdamWOptimizer", "AdamW_HinaAdaptive", "Automagic_CameAMP"])
def test_float64_weights_with_weight_decay(name):
    """float64 weights step (Sinkgd's AdaDecay statistics failed on them) and decay by factors formed in float64."""
    from sd_hina_plugin import registry

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.float64))
    extra = {"optim_bits": 32} if "Hina" in name else {}
    opt = registry.create_optimizer(name, [("lora_unet_x.lora_down.weight", p)], lr=1e-3, weight_decay=0.1, **extra)
    for _ in range(4):
        p.grad = torch.randn_like(p)
        opt.step()
    assert p.dtype == torch.float64 and torch.isfinite(p).all()


def test_float64_decay_factor_keeps_its_precision():
    """lr * wd = 1e-9: in fp32, 1 - 1e-9 rounds to 1 and the decay vanishes; in float64 it is applied."""
    p = torch.nn.Parameter(torch.full((4, 4), 1.0, dtype=torch.float64))
    opt = Automagic_Sinkgd([p], lr=1e-6, weight_decay=1e-3, lr_bump=0.0, max_lr=1.0, warmup_steps=0)
    p.grad = torch.zeros_like(p)
    opt.step()  # first step: initialisation only (momentum 0)
    before = p.detach().clone()
    p.grad = torch.zeros_like(p)  # no direction (|m| = 0): only the decay moves the weights
    opt.step()
    theta = opt.state[p]["adadecay.theta"].double()
    torch.testing.assert_close(p.detach(), before * (1 - 1e-6 * 1e-3 * theta), rtol=1e-15, atol=0)
    assert not torch.equal(p.detach(), before)


def _importance_run(strength):
    from test_hina_adaptive import _named, _run

    named = _named()
    opt = AdamW_HinaAdaptive([p for _, p in named], optim_bits=32, use_lr_mask=False, importance_decay=0.5,
                             adaptation_strength=strength).attach_names(named)
    _run(opt, named, 12)
    return torch.cat([p.detach().flatten() for _, p in named])


def test_adaptation_strength_acts_over_its_whole_range():
    """1.0, 1.2 and 3.0 give different runs (a bound that importance never reached made them identical)."""
    runs = {a: _importance_run(a) for a in (0.5, 1.0, 1.2, 3.0)}
    for a, b in ((0.5, 1.0), (1.0, 1.2), (1.2, 3.0)):
        assert not torch.equal(runs[a], runs[b]), (a, b)


def test_adaptation_strength_is_a_power_of_importance():
    from test_hina_adaptive import _named, _run

    named = _named()
    opt = AdamW_HinaAdaptive([p for _, p in named], optim_bits=32, use_lr_mask=False, importance_decay=0.5,
                             adaptation_strength=2.0).attach_names(named)
    seen = {}
    from sd_hina_plugin.techniques.adaptive import AdaptiveImportance

    original = AdaptiveImportance.run

    def spy(self, ctx):
        before = ctx.u.clone()
        original(self, ctx)
        blended = ctx.opt.step_cache[self.name][id(ctx.pack)]
        seen[id(ctx.pack)] = (before, ctx.u.clone(), blended.clone(), ctx)

    AdaptiveImportance.run = spy
    try:
        _run(opt, named, 6)
    finally:
        AdaptiveImportance.run = original
    checked = 0
    for before, after, blended, ctx in seen.values():
        expected = blended.pow(2.0).clamp(1 / 3, 3)
        for b in ctx.pack.buckets:
            ratio = b.rows(after).norm(dim=1) / b.rows(before).norm(dim=1).clamp_min(1e-30)
            torch.testing.assert_close(ratio, expected[b.first:b.first + b.count], rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked


@pytest.mark.parametrize("cls", [Automagic_CameAMP, Automagic_Sinkgd, AdamW_HinaAdaptive])
def test_absolute_bounds_below_the_lr_hold_from_the_first_step(cls):
    """An upstream config whose max_lr is below the lr (max_lr=5e-4 at lr 1e-3): the mask starts at the bound,
    so no step ever uses more than max_lr per element, the first included."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = cls([w], lr=1e-3, min_lr=5e-7, max_lr=5e-4, warmup_steps=20)
    for step in range(1, 4):
        before = w.detach().clone()
        w.grad = torch.randn_like(w)
        opt.step()
        assert opt.lr_mask(w).max().item() <= 0.5 + 1e-6, step
        assert opt.state[w]["lr_mask"].max().item() <= 5e-4 * (1 + 1e-6)
        if step == 1 and not torch.equal(w, before):  # a first step that updates uses the bounded lr
            assert opt.lr_mask(w).max().item() <= 0.5 + 1e-6


@pytest.mark.parametrize("name", ["Automagic_CameAMP", "Automagic_CameAMP8bit", "Automagic_CameAMP_COptim",
                                  "Automagic_CameAMP_COptim8bit", "Automagic_Sinkgd", "AdamW_HinaAdaptive"])
@pytest.mark.parametrize("kwargs", [{}, {"min_lr": 1e-5, "max_lr": 5e-4, "lr_bump": 1e-4}, {"lr_bump": 0.0}],
                         ids=["defaults", "starts-at-max_lr", "fixed-mask"])
def test_avg_lr_is_reported_from_the_first_step(name, kwargs):
    """hina/avg_lr/<group> is in stats() after step 1 (whose ADOPT / CAME / SinkGD first step ends before the
    mask runs) and equals the group's lr times the mask's mean, which starts at 1 or at the nearest bound."""
    import sd_hina_plugin

    if "8bit" in name:
        kwargs = {**kwargs, "min_8bit_size": 0}  # the 8-bit packs' mask (uint8 codes)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 16))
    opt = sd_hina_plugin.create_optimizer(name, [p], lr=1e-3, **kwargs)
    for step in (1, 2):
        p.grad = torch.randn_like(p)
        opt.step()
        stats = opt.stats()
        assert "hina/avg_lr/group0" in stats, (step, sorted(stats))
        expected = 1e-3 * opt.lr_mask(p).double().mean().item()
        assert stats["hina/avg_lr/group0"] == pytest.approx(expected, rel=1e-5), step
        if step == 1:
            assert expected == pytest.approx(5e-4 if "max_lr" in kwargs else 1e-3)


# -- the 8-bit CameAMP names' mask against the fp32 names' ------------------------------------------------------
# On tensors with 8-bit state the mask is a 10-bit code; it must hold what the fp32 names' int16 count holds:
# the start at the nearest bound when absolute bounds exclude the lr, and the whole of the default 0.1x-10x.

TWINS = [("Automagic_CameAMP", "Automagic_CameAMP8bit"), ("Automagic_CameAMP_COptim", "Automagic_CameAMP_COptim8bit")]
TWIN_IDS = ["CameAMP", "COptim"]
#: (lr, arguments, the mask at step 1, steps run): absolute bounds that exclude the built-with lr
EXCLUDING = {
    "above-the-lr": (1e-3, dict(min_lr=2e-3, max_lr=5e-3, lr_bump=1e-4, warmup_steps=20), 2.0, 22),
    "below-the-lr": (1e-3, dict(min_lr=1e-5, max_lr=5e-4, lr_bump=1e-4, warmup_steps=4), 0.5, 6),
    "upstream-W8": (3e-3, dict(min_lr=1e-7, max_lr=1e-3, lr_bump=3e-6, warmup_steps=8), 0.333, 10),
    "upstream-W500": (3e-3, dict(min_lr=1e-7, max_lr=1e-3, lr_bump=3e-6), 0.333, 12),  # (not to the end of warm-up)
}


def _mask_history(name, lr, steps, rows=0, planes=None, **kwargs):
    """The mask of a 64x64 tensor (8-bit state in the 8-bit names: 4096 elements reach min_8bit_size) after each
    step, under random gradients; with ``rows``, the first ``rows`` rows never change sign (the mask rises every
    step) and the next ``rows`` change sign every step (it falls). ``planes``: the bit planes the 8-bit code has."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
    opt = sd_hina_plugin.create_optimizer(name, [w], lr=lr, **kwargs)
    gen = torch.Generator().manual_seed(1)
    masks = []
    for t in range(steps):
        g = torch.randn(64, 64, generator=gen)
        g[:rows] = g[:rows].abs()
        g[rows:2 * rows] = g[rows:2 * rows].abs() * (-1) ** t
        w.grad = g
        opt.step()
        masks.append(opt.lr_mask(w).clone())
    assert ("lr_mask.code" in opt.state[w]) == ("8bit" in name)  # the 8-bit names' packed code is what is tested
    if planes is not None and "8bit" in name:
        assert f"lr_mask.code.bit{7 + planes}" in opt.state[w] and f"lr_mask.code.bit{8 + planes}" not in opt.state[w]
    return masks


@pytest.mark.parametrize("twins", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("config", list(EXCLUDING), ids=list(EXCLUDING))
def test_eight_bit_mask_starts_at_the_nearest_bound_as_fp32(twins, config):
    """Absolute bounds that exclude the built-with lr: the 8-bit names' mask starts at the nearest bound and
    then equals the fp32 name's element for element, to the end of warm-up and after it (their window was
    once placed as if the mask started at 1: 3.0, 26.1, 1.10 and 0.589 at step 1 instead of 2.0, 0.5, 0.333)."""
    lr, kwargs, start, steps = EXCLUDING[config]
    fp32, eight = (_mask_history(name, lr, steps, **kwargs) for name in twins)
    torch.testing.assert_close(fp32[0], torch.full((64, 64), start), rtol=0, atol=1e-3)
    for t, (a, b) in enumerate(zip(fp32, eight), start=1):
        assert torch.equal(a, b), (t, a.mean().item(), b.mean().item())
    assert not torch.equal(fp32[0], fp32[-1])  # the mask moved (down from max_lr, or up from min_lr)


@pytest.mark.parametrize("twins", TWINS, ids=TWIN_IDS)
def test_eight_bit_mask_reaches_the_default_upper_bound_as_fp32(twins):
    """The default relative bounds (0.1x-10x in bumps of 0.01): elements whose gradient never changes sign rise
    to 10x by the end of a 1000-step warm-up in both storages (the 8-bit code once stopped at 2.65x), those
    whose gradient changes sign every step fall to 0.1x."""
    fp32, eight = (_mask_history(name, 1e-3, 1002, rows=16, planes=2, warmup_steps=1000) for name in twins)
    for t in (1, 100, 300, 1001, 1002):
        assert torch.equal(fp32[t - 1], eight[t - 1]), t
    torch.testing.assert_close(eight[-1][:16], torch.full((16, 64), 10.0))
    torch.testing.assert_close(eight[-1][16:32], torch.full((16, 64), 0.1))
    assert 0.1 < eight[-1][32:].mean().item() < 10.0  # the others walk


def test_eight_bit_code_widens_for_a_finer_bump():
    """lr_mask_bump=0.001 with W = 600: 1201 reachable points need an 11-bit code; the mask rises to 1.599 and
    falls to 0.401 as the fp32 one does (a 10-bit window around the start would stop at 1.511 and 0.488)."""
    fp32, eight = (_mask_history(name, 1e-3, 602, rows=16, planes=3, lr_mask_bump=0.001, warmup_steps=600)
                   for name in ("Automagic_CameAMP", "Automagic_CameAMP8bit"))
    assert torch.equal(fp32[-1], eight[-1])
    torch.testing.assert_close(eight[-1][:16], torch.full((16, 64), 1.599))
    torch.testing.assert_close(eight[-1][16:32], torch.full((16, 64), 0.401))
    # codes over 14 bits are read in int32: a bump of 1e-4 between 0.1x and 3x with W = 40000 takes 15 bits
    kwargs = dict(min_lr=1e-4, max_lr=3e-3, lr_bump=1e-7, warmup_steps=40000)
    fp32, eight = (_mask_history(name, 1e-3, 6, rows=16, planes=7, **kwargs)
                   for name in ("Automagic_CameAMP", "Automagic_CameAMP8bit"))
    assert all(torch.equal(a, b) for a, b in zip(fp32, eight))
    torch.testing.assert_close(eight[-1][:32], torch.cat([torch.full((16, 64), 1.0005), torch.full((16, 64), 0.9995)]))


@pytest.mark.parametrize("name", ["Automagic_CameAMP8bit", "Automagic_CameAMP_COptim8bit"])
def test_eight_bit_mask_resumes_exactly_with_bounds_excluding_the_lr(name):
    def build(w):
        return sd_hina_plugin.create_optimizer(name, [w], lr=1e-3, min_lr=2e-3, max_lr=5e-3, lr_bump=1e-4, warmup_steps=20)

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
    grads = [torch.randn(64, 64) for _ in range(26)]
    opt = build(w)
    for g in grads[:9]:  # saved while the mask learns
        w.grad = g
        opt.step()
    saved_w, saved = w.detach().clone(), roundtrip(opt.state_dict())
    w2 = torch.nn.Parameter(saved_w.clone())
    opt2 = build(w2)
    opt2.load_state_dict(saved)
    for g in grads[9:]:
        for p, o in ((w, opt), (w2, opt2)):
            p.grad = g.clone()
            o.step()
    assert torch.equal(opt.lr_mask(w), opt2.lr_mask(w2)) and torch.equal(w, w2)


def _as_saved_with_8bit_codes(sd, codes):
    """``sd`` as sd_hina_plugin saved 8-bit masks before the 10-bit codes: ``lr_mask.code`` holding ``j mod 256``
    (``codes``: the lattice indices j, or the stored uint8 codes), no bit planes."""
    entry = dict(sd["state"][0])
    entry["lr_mask.code"] = torch.remainder(codes.to(torch.int32), 256).to(torch.uint8)
    for key in [k for k in entry if k.startswith("lr_mask.code.bit")]:
        del entry[key]
    hina = {k: v for k, v in sd["hina"].items() if k != "mask_code"}  # (the version of the codes came with them)
    return {**sd, "state": {0: entry}, "hina": hina}


@pytest.mark.parametrize("name", ["Automagic_CameAMP8bit", "Automagic_CameAMP_COptim8bit"])
def test_checkpoints_with_8bit_mask_codes_load(name):
    """State dicts saved with the earlier 8-bit codes load: each element keeps its lattice point and training
    continues as if uninterrupted where that point lies within the bounds; a point the old window decoded to
    outside them (26.1 for max_lr=5e-4 at lr 1e-3, code 251) is put back within them."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
    grads = [torch.randn(64, 64) for _ in range(30)]
    opt = sd_hina_plugin.create_optimizer(name, [w], lr=1e-3)  # default relative bounds, W = 500
    for g in grads[:20]:
        w.grad = g
        opt.step()
    sd = roundtrip(opt.state_dict())
    j = LatticeLrMask.decode(opt.state[w], opt.param_groups[0])
    assert j.min().item() < 0 < j.max().item()  # codes of negative and positive points
    old = _as_saved_with_8bit_codes(sd, j)
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = sd_hina_plugin.create_optimizer(name, [w2], lr=1e-3)
    opt2.load_state_dict(old)
    assert torch.equal(opt2.lr_mask(w2), opt.lr_mask(w))
    for g in grads[20:]:
        for p, o in ((w, opt), (w2, opt2)):
            p.grad = g.clone()
            o.step()
    assert torch.equal(opt.lr_mask(w), opt2.lr_mask(w2)) and torch.equal(w, w2)

    # a run of the earlier version with max_lr=5e-4 at lr 1e-3 stored code 251 (decoded as 26.1) everywhere
    kwargs = dict(min_lr=1e-5, max_lr=5e-4, lr_bump=1e-4, warmup_steps=4)
    w3 = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
    opt3 = sd_hina_plugin.create_optimizer(name, [w3], lr=1e-3, **kwargs)
    for g in grads[:3]:
        w3.grad = g
        opt3.step()
    old = _as_saved_with_8bit_codes(roundtrip(opt3.state_dict()), torch.full((64, 64), 251))
    w4 = torch.nn.Parameter(w3.detach().clone())
    opt4 = sd_hina_plugin.create_optimizer(name, [w4], lr=1e-3, **kwargs)
    opt4.load_state_dict(old)
    torch.testing.assert_close(opt4.lr_mask(w4), torch.full((64, 64), 0.5))
    assert opt4.state[w4]["lr_mask"].max().item() <= 5e-4 * (1 + 1e-6)
