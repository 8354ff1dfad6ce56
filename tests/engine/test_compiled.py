"""compile=True: each pack's technique chain compiled by torch.compile (engine/compiled.py).

What is checked, against the eager step (the reference):
* the same parameters and state within a stated tolerance over 50 steps, under a warm-up scheduler that starts
  at lr 0, with every phase of the optimizer reached (short warm-ups): max |compiled - eager| / max |eager| at most
  ``TOL`` (fp32 state: float reassociation in fused loops, amplified by sign-based techniques such as Cautious;
  8-bit state: an element near a code boundary may take the neighbouring code; bf16 parameters use round-to-nearest
  here, since stochastic rounding turns any last-bit difference into a different random decision);
* one graph per pack for the first phase (steps 2 and 3: the lr, the step and its numbers are inputs from the
  first compile on, and nothing a technique derives for a pack is made inside the graph), and no graph compiled
  once every phase has been reached: 100 further steps with the lr changing every step;
* a state dict saved by a compiled run loads into an eager one bit for bit and back, and both continue alike;
* zero host syncs in a compiled step (counted by the profiler: a dispatch mode makes the step eager);
* where compiling fails, the step runs eagerly, once, with one log line saying why.

The default run compiles HinaAdamWCore only (a few seconds of compiling); every registered optimizer, in its own
precision and in the others where its code paths differ (see ``_matrix``), runs with ``-m compiled`` (CI runs it
last, in a time box).
"""

from __future__ import annotations

import logging

import pytest
import torch

import sd_hina_plugin
from sd_hina_plugin import registry
from sd_hina_plugin.diagnostics import count_step, profiled_syncs
from sd_hina_plugin.engine import compiled as compiled_module
from support import suite_device

DEVICE = suite_device()  # scripts/device_check.sh runs these on a GPU (SD_HINA_TEST_DEVICE=cuda)

TOL = {"fp32": 1e-4, "bf16": 1e-2, "8bit": 2e-3}
#: every phase of every optimizer within the first 30 steps
EARLY = {"warmup_steps": 12, "wd_transition_steps": 10, "decay_threshold": 1e-6, "relationship_discovery_interval": 5,
         "stats_update_freq": 4}


def _named(dtype: torch.dtype, big: bool = False) -> list[tuple[str, torch.nn.Parameter]]:
    """Two kohya LoRA modules (down/up pairs), a conv LoRA pair and a 1-D scale."""
    r, d = (4, 64) if not big else (16, 512)
    g = torch.Generator().manual_seed(0)
    shapes = [("lora_unet_a.lora_down.weight", (r, d)), ("lora_unet_a.lora_up.weight", (d, r)),
              ("lora_unet_b.lora_down.weight", (r, d)), ("lora_unet_b.lora_up.weight", (d, r)),
              ("lora_unet_c.lora_down.weight", (r, 8, 3, 3)), ("lora_unet_c.lora_up.weight", (8, r, 1, 1)),
              ("lora_unet_d.scale", (d,))]
    return [(n, torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(DEVICE, dtype))) for n, s in shapes]


def _kwargs(name: str, mode: str) -> dict:
    fields = registry.resolve(name).cls.Config.FIELDS
    kwargs = {k: v for k, v in EARLY.items() if k in fields}
    if mode == "bf16":
        kwargs["low_precision_update"] = "nearest"
    if mode == "8bit":
        kwargs.update({"optim_bits": 8} if "optim_bits" in fields else {})
        kwargs["min_8bit_size"] = 0
    elif "optim_bits" in fields:
        kwargs["optim_bits"] = 32
    return kwargs


def _build(name: str, mode: str, compile: bool):
    dtype = torch.bfloat16 if mode == "bf16" or name == "AdamWBF16_HinaAdaptive" else torch.float32
    named = _named(dtype, big=mode == "8bit")
    opt = sd_hina_plugin.create_optimizer(name, named, lr=1e-3, compile=compile, **_kwargs(name, mode))
    return opt, [p for _, p in named]


def _warmup(opt) -> torch.optim.lr_scheduler.LambdaLR:
    """A warm-up from lr 0 over 10 steps, then a wobble, so that the lr differs at every step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 10 if s < 10 else 1.0 + 0.1 * ((s * 7) % 5 - 2) / 2)


def _grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 0.01).to(p.device, p.dtype)


def _run(opt, params, sched, start: int, stop: int) -> None:
    for step in range(start, stop):
        _grads(params, step)
        opt.step()
        sched.step()


def _gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    scale = max(float(x.detach().float().abs().max()) for x in a)
    return max(float((x.detach().float() - y.detach().float()).abs().max()) for x, y in zip(a, b)) / scale


def _state(opt) -> list[torch.Tensor]:
    return [v for p in opt.state for k, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor) and v.is_floating_point()]


def _counts(opt) -> list[torch.Tensor]:
    """Integer state: the lr masks' counts and signs (a compiled step works on int32 copies of the int16 counts)."""
    return [v for p in opt.state for k, v in sorted(opt.state[p].items())
            if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dim() and not k.endswith(".q")]


def check_matches_eager(name: str, mode: str, steps: int = 50, more: int = 100) -> None:
    eager, pe = _build(name, mode, compile=False)
    comp, pc = _build(name, mode, compile=True)
    se, sc = _warmup(eager), _warmup(comp)
    _run(eager, pe, se, 0, steps)
    _run(comp, pc, sc, 0, 3)  # steps 2 and 3 (the first is eager): one phase, so one graph per pack, not two
    assert set(comp._compiled.graphs().values()) == {1}, comp._compiled.graphs()
    _run(comp, pc, sc, 3, steps)
    assert comp.get_optimization_info()["compile"]["eager"] == []
    gap = max(_gap(pe, pc), _gap(_state(eager), _state(comp)) if mode != "8bit" else 0.0)
    assert gap <= TOL[mode], f"{name} ({mode}): compiled differs from eager by {gap:.2e} of the largest value"
    for a, b in zip(_counts(eager), _counts(comp)):  # the same dtype, and the same counts but where a sign flipped
        assert a.dtype == b.dtype and (a == b).float().mean() >= 0.999, (name, a.dtype, b.dtype)
    graphs = comp._compiled.graphs()
    _run(comp, pc, sc, steps, steps + more)
    assert comp._compiled.graphs() == graphs, "a graph was compiled after every phase had been reached"
    assert profiled_syncs(comp) == 0


def check_resume_across(name: str, mode: str, steps: int = 20, more: int = 10) -> None:
    """Compiled -> eager and eager -> compiled: the state dict loads bit for bit; the continuations agree."""
    for first, second in ((True, False), (False, True)):
        a, pa = _build(name, mode, compile=first)
        sa = _warmup(a)
        _run(a, pa, sa, 0, steps)
        saved = a.state_dict()
        b, pb = _build(name, mode, compile=second)
        with torch.no_grad():
            for x, y in zip(pb, pa):
                x.copy_(y)
        sb = _warmup(b)  # as a trainer resumes: optimizer and scheduler built, then both states loaded
        b.load_state_dict(saved)
        sb.load_state_dict(sa.state_dict())
        again = b.state_dict()
        for key, state in saved["state"].items():
            for slot, value in state.items():
                assert torch.equal(value, again["state"][key][slot]), (name, slot)
        _run(a, pa, sa, steps, steps + more)
        _run(b, pb, sb, steps, steps + more)
        assert _gap(pa, pb) <= TOL[mode]


# -- the default run: HinaAdamWCore -------------------------------------------------------------------------------
def test_core_matches_eager_and_compiles_once_per_phase():
    check_matches_eager("HinaAdamWCore", "fp32")


def test_core_compiles_one_graph_per_pack_and_phase():
    """HinaAdamWCore has one phase after its (eager) first step: one graph per pack, compiled at the second step,
    whatever the lr and the bias corrections do. The lr and the step's numbers enter as tensors and the step as a
    symbolic int from the first compile on; as Python numbers dynamo would first compile a graph with them as
    constants, then another with them as inputs."""
    opt, params = _build("HinaAdamWCore", "fp32", compile=True)
    _run(opt, params, _warmup(opt), 0, 2)
    assert set(opt._compiled.graphs().values()) == {1}
    _run(opt, params, _warmup(opt), 2, 15)
    assert set(opt._compiled.graphs().values()) == {1}


def test_core_resume_between_compiled_and_eager():
    check_resume_across("HinaAdamWCore", "fp32")


def test_core_compiled_trains_a_lora():
    """A real forward/backward loop (not synthetic gradients): the loss falls as far as with the eager step."""
    from support import lora_problem, loss_on, train, trainable

    if DEVICE.type != "cpu":
        pytest.skip("the LoRA problem is built on the CPU")

    losses = {}
    for compile in (False, True):
        model, data = lora_problem(seed=3)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = sd_hina_plugin.create_optimizer("HinaAdamWCore", named, lr=3e-3, compile=compile)
        start = loss_on(model, data)
        train(model, opt, data, 40)
        losses[compile] = loss_on(model, data) / start
        assert len(trainable(model)) == len(named)
    assert losses[True] < 0.9
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def _refusing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


def test_failed_compile_runs_the_step_eagerly_once_and_says_why(monkeypatch, caplog):
    """A backend that cannot compile (as without a C++ toolchain): the same result as eager, bit for bit (no
    step run twice, no state changed by the attempt), and one log line naming the reason."""
    original = compiled_module.CompiledSteps.__init__
    monkeypatch.setattr(compiled_module.CompiledSteps, "__init__",
                        lambda self, mode=None, backend=None: original(self, mode, _refusing_backend))
    eager, pe = _build("HinaAdamWCore", "fp32", compile=False)
    comp, pc = _build("HinaAdamWCore", "fp32", compile=True)
    with caplog.at_level(logging.WARNING, logger="sd_hina_plugin"):
        _run(eager, pe, _warmup(eager), 0, 8)
        _run(comp, pc, _warmup(comp), 0, 8)
    assert all(torch.equal(a, b) for a, b in zip(pe, pc))
    assert all(torch.equal(a, b) for a, b in zip(_state(eager), _state(comp)))
    lines = [r.getMessage() for r in caplog.records if "could not be compiled" in r.getMessage()]
    assert len(lines) == 1 and "no compiler here" in lines[0]
    assert comp.get_optimization_info()["compile"]["eager"]


def test_dispatch_mode_sees_the_eager_step():
    """Under an op counter (a TorchDispatchMode) a compiled optimizer runs its eager step, which is counted."""
    opt, params = _build("HinaAdamWCore", "fp32", compile=True)
    _grads(params, 0)
    opt.step()
    counter = count_step(opt)
    assert counter.total > 0 and counter.syncs == 0


def test_compile_is_off_by_default_and_validated():
    opt, _ = _build("HinaAdamWCore", "fp32", compile=False)
    assert opt.param_groups[0]["compile"] is False
    assert registry.resolve("HinaAdamWCore").cls.Config.FIELDS["compile"].default is False
    with pytest.raises((TypeError, ValueError), match="compile"):
        sd_hina_plugin.create_optimizer("HinaAdamWCore", _named(torch.float32), lr=1e-3, compile="sometimes")


# -- every optimizer (-m compiled) -------------------------------------------------------------------------------
def _matrix() -> list[tuple[str, str]]:
    """Every optimizer in the precision it is made for (fp32 state, or 8-bit for the 8-bit names, bf16 weights for
    AdamWBF16_HinaAdaptive); bf16 weights and 8-bit state also where the code paths differ from those (the
    AdamW family with optim_bits=8, HinaAdamWCore and a CameAMP on bf16 weights). Each case compiles two packs'
    phases: minutes on 2 CPU cores, so the matrix is not every name in every precision."""
    cases = []
    for spec in registry.specs():
        if spec.name == "AdamWBF16_HinaAdaptive":
            cases.append((spec.name, "bf16"))
        elif spec.name.endswith("8bit"):
            cases.append((spec.name, "8bit"))
        else:
            cases.append((spec.name, "fp32"))
    cases += [("HinaAdamWCore", "bf16"), ("Automagic_CameAMP", "bf16")]
    cases += [(name, "8bit") for name in ("HinaAdamWCore", "HinaAdamWOptimizer", "AdamW_HinaAdaptive")]
    return cases


@pytest.mark.compiled
@pytest.mark.parametrize("name, mode", _matrix(), ids=lambda v: str(v))
def test_every_optimizer_matches_eager(name, mode):
    check_matches_eager(name, mode, more=30)


@pytest.mark.compiled
@pytest.mark.parametrize("name, mode", [("AdamWBF16_HinaAdaptive", "bf16"), ("Automagic_CameAMP8bit", "8bit"),
                                        ("Automagic_Sinkgd", "fp32"), ("HinaAdamWOptimizer", "fp32")], ids=str)
def test_resume_across_compiled_and_eager(name, mode):
    check_resume_across(name, mode)
