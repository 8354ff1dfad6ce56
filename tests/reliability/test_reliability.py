"""Faults, bad input, resume through accelerate, gradient accumulation, memory, multi-process DDP."""

from __future__ import annotations

import copy
import gc
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from support import lora_problem, loss_on, make, param_dtype, problem_lr, train, trainable

from sd_hina_plugin import HinaAdamWCore, registry

SPECS = registry.specs()


# -- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_bad_inputs_have_clear_errors(spec, monkeypatch):
    dtype = param_dtype(spec.name)
    a, b = torch.nn.Parameter(torch.zeros(4, 4, dtype=dtype)), torch.nn.Parameter(torch.zeros(4, dtype=dtype))
    with pytest.raises(ValueError, match="more than one parameter group|appear in more than one"):
        spec.cls([{"params": [a]}, {"params": [a, b]}])
    spec.cls([{"params": [a]}, {"params": []}])  # empty groups are accepted, as in torch.optim
    opt = spec.cls([a])
    a.grad = torch.zeros(4, 4, dtype=dtype).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients are not supported"):
        opt.step()
    import sd_hina_plugin.numerics.quant8 as quant8

    monkeypatch.setattr(quant8, "bnb_available", lambda: (False, "no kernels for this device"))
    if "optim_bits" in spec.config.FIELDS:
        with pytest.raises(RuntimeError, match="8-bit state needs bitsandbytes.*no kernels for this device.*use optim_bits=32"):
            spec.cls([b], optim_bits=8)
    elif spec.name.endswith("8bit"):  # the CameAMP 8-bit names take no optim_bits: the message names the fp32 class
        with pytest.raises(RuntimeError, match=f"no kernels for this device.*use {spec.name[:-4]} \\(the same optimizer with 32-bit state\\)"):
            spec.cls([b])


# -- resume through accelerate (kohya --save_state / --resume) ----------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_accelerate_save_state_and_load_state_continue_identically(spec, tmp_path):
    from accelerate import Accelerator

    dtype = param_dtype(spec.name)
    lr = problem_lr(spec)

    def setup():
        accelerator = Accelerator(cpu=True)
        model, data = lora_problem(dtype=dtype)
        opt = make(spec.name, trainable(model), lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
        model, opt, sched = accelerator.prepare(model, opt, sched)
        return accelerator, model, opt, sched, data

    def steps(model, opt, sched, data, start, n):
        for i in range(start, start + n):
            x, y = data[i % len(data)]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
            opt.step()
            sched.step()

    accelerator, model, opt, sched, data = setup()
    steps(model, opt, sched, data, 0, 4)
    accelerator.save_state(str(tmp_path / "state"))
    steps(model, opt, sched, data, 4, 4)
    expected = [p.detach().clone() for p in trainable(model)]

    accelerator2, model2, opt2, sched2, _ = setup()
    accelerator2.load_state(str(tmp_path / "state"))
    steps(model2, opt2, sched2, data, 4, 4)
    for p, q in zip(expected, trainable(model2)):
        assert torch.equal(p, q)


# -- gradient accumulation, zero_grad --------------------------------------------------------------------------

@pytest.mark.parametrize("set_to_none", [True, False])
def test_accumulation_and_zero_grad_behave_like_torch(set_to_none):
    model_a, data = lora_problem()
    model_b, _ = lora_problem()
    ours = HinaAdamWCore(trainable(model_a), lr=1e-3)
    ref = torch.optim.AdamW(trainable(model_b), lr=1e-3, foreach=False)
    for step in range(6):
        for model, opt in ((model_a, ours), (model_b, ref)):
            opt.zero_grad(set_to_none=set_to_none)
            for micro in range(2):  # two micro-batches accumulate into .grad
                x, y = data[(2 * step + micro) % len(data)]
                (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
            if step == 3 and not set_to_none:
                trainable(model)[0].grad.zero_()  # a zero (not None) gradient still steps, as in torch
            opt.step()
    for p, q in zip(trainable(model_a), trainable(model_b)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    ours.zero_grad(set_to_none=set_to_none)
    assert all((p.grad is None) == set_to_none for p in trainable(model_a))


# -- memory ---------------------------------------------------------------------------------------------------

def test_a_thousand_steps_do_not_grow_memory():
    """Scratch and state sizes stay fixed from step 20 on; the number of live tensors is the same after 1000
    and after 1500 steps (dynamic weight decay starts at step 1000 and caches its per-tensor values once);
    the process does not grow."""
    psutil = pytest.importorskip("psutil")
    model, data = lora_problem()
    opt = make("HinaAdamWOptimizer", trainable(model), 1e-3)

    def census() -> int:
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on torch's deprecated proxy objects warns
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    train(model, opt, data, 20)
    pool, state = opt._pool.nbytes(), opt.state_bytes()
    rss = psutil.Process().memory_info().rss
    train(model, opt, data, 1000, start=20)
    after_1000 = census()
    train(model, opt, data, 500, start=1020)
    assert census() <= after_1000
    assert opt._pool.nbytes() == pool and opt.state_bytes() == state
    assert psutil.Process().memory_info().rss - rss < 32 * 2**20


def test_accelerate_fp16_mixed_precision_trains():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    model, data = lora_problem()
    opt = make("HinaAdamWOptimizer", trainable(model), 1e-3)
    model, opt = accelerator.prepare(model, opt)
    before = loss_on(model, data)
    for i in range(40):
        x, y = data[i % len(data)]
        opt.zero_grad(set_to_none=True)
        with accelerator.autocast():
            loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        accelerator.backward(loss)
        opt.step()
    assert loss_on(model, data) < 0.8 * before


# -- two processes, gloo, DistributedDataParallel --------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, names: list[str], out_dir: str, closure: bool = False) -> None:
    import torch.distributed as dist
    from support import lora_problem, make, param_dtype, problem_lr, trainable

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for name in names:
        model, data = lora_problem(dtype=param_dtype(name))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = make(name, trainable(ddp), problem_lr(registry.resolve(name)))
        for step in range(20):
            x, y = data[(step + rank) % len(data)]  # each rank its own batch; DDP averages the gradients

            def loss_of_step(x=x, y=y):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.mse_loss(ddp(x).float(), y.float())
                loss.backward()
                return loss

            if closure:  # (a closure's loss is the rank's own: the COptim context takes it)
                opt.step(loss_of_step)
            else:
                loss_of_step()
                opt.step()
        tensors = [p.detach().double().flatten() for p in trainable(ddp)]
        if hasattr(opt, "c_optim"):
            tensors.append(opt.c_optim.t["hist"].double().flatten())
        tensors += [v.double().flatten() for p in trainable(ddp) for v in opt.state[p].values()
                    if isinstance(v, torch.Tensor)]
        torch.save(torch.cat(tensors), os.path.join(out_dir, f"{name}-{rank}.pt"))
        del ddp, opt  # (DDP's reducer holds the process group: released before it is destroyed)
    gc.collect()
    dist.destroy_process_group()


def test_ddp_two_processes_keep_parameters_and_state_identical(tmp_path):
    names = [s.name for s in SPECS]
    mp.spawn(_ddp_worker, args=(2, _free_port(), names, str(tmp_path)), nprocs=2, join=True)
    for name in names:
        rank0 = torch.load(tmp_path / f"{name}-0.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"{name}-1.pt", weights_only=True)
        assert torch.equal(rank0, rank1), name


def test_ddp_with_a_closure_keeps_the_coptim_context_identical(tmp_path):
    """step(closure) hands the context each rank's own loss; the ranks' mean is used, so the lr multiplier, and with it
    parameters and state, stay the same on every rank (each rank's own loss made them drift apart)."""
    names = ["Automagic_CameAMP_COptim"]
    mp.spawn(_ddp_worker, args=(2, _free_port(), names, str(tmp_path), True), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / f"{names[0]}-0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / f"{names[0]}-1.pt", weights_only=True)
    assert torch.equal(rank0, rank1)


def _one_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    return dist


def _sharded_run(order: str, name: str) -> list[torch.Tensor]:
    """Four steps of ``name`` on a small model, plain or under FSDP2 on one rank (``order``: "plain", "shard-first",
    or accelerate's: built on the plain parameters, then switched to the sharded ones by accelerate's own helper)."""
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.GELU(), torch.nn.Linear(6, 1))
    spec = next(s for s in SPECS if s.name == name)
    if order == "shard-first":
        fully_shard(model)
    opt = spec.cls(model.named_parameters(), lr=1e-2)
    if order == "accelerate":
        originals = [p.data_ptr for p in model.parameters()]  # (accelerate keys its map by the bound method)
        fully_shard(model)
        fsdp2_switch_optimizer_parameters(opt, dict(zip(originals, model.parameters())))
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(4, 8, generator=gen)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]


@pytest.mark.parametrize("name", ["HinaAdamWCore", "Automagic_CameAMP", "Automagic_Sinkgd"])
def test_fsdp2_on_one_rank_trains_as_the_plain_model_in_both_orders(tmp_path, name):
    """FSDP2's sharded parameters (DTensors) on a one-rank mesh, in both orders users meet: built after
    fully_shard, and accelerate's (its own fsdp2_switch_optimizer_parameters swaps them in after construction; this
    used to fail inside a foreach op). The 2-rank runs against one process are in tests/distributed (-m distributed)."""
    dist = _one_rank(tmp_path)
    try:
        plain = _sharded_run("plain", name)
        for order in ("shard-first", "accelerate"):
            for a, b in zip(_sharded_run(order, name), plain):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_dtensor_layouts_fsdp2_does_not_make_are_refused_clearly(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist = _one_rank(tmp_path)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
        with pytest.raises(TypeError, match=r"laid out as \(Shard\(dim=1\),\).*tensor parallel"):
            HinaAdamWCore([weight])
    finally:
        dist.destroy_process_group()


def test_bf16_only_optimizer_refuses_fp32_sharded_parameters_swapped_in(tmp_path):
    """accelerate's FSDP2 setup upcasts the model to fp32 and swaps the sharded parameters into the groups of an
    optimizer built on bf16 ones: the bf16-only optimizer must refuse them as it refuses plain fp32 parameters."""
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters
    from torch.distributed.fsdp import fully_shard

    from sd_hina_plugin import AdamWBF16_HinaAdaptive

    dist = _one_rank(tmp_path)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 1)).to(torch.bfloat16)
        opt = AdamWBF16_HinaAdaptive(model.named_parameters(), lr=1e-3)
        originals = [p.data_ptr for p in model.parameters()]
        model.float()
        fully_shard(model)
        fsdp2_switch_optimizer_parameters(opt, dict(zip(originals, model.parameters())))
        model(torch.randn(4, 8)).square().mean().backward()
        with pytest.raises(TypeError, match="needs bfloat16 parameters; got group 0 parameter 0 \\(float32\\)"):
            opt.step()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_add_param_group_after_steps_keeps_existing_state(spec):
    # seeded, and lr 1e-2: at 1e-3 the new group's two updates (its first step only initialises ADOPT's v)
    # moved no element of a 64-element bf16 tensor in about one run in ten (bf16 ulp at 1 is 0.008)
    torch.manual_seed(0)
    dtype = param_dtype(spec.name)
    a = torch.nn.Parameter(torch.randn(8, 8, dtype=dtype))
    b = torch.nn.Parameter(torch.randn(8, 8, dtype=dtype))
    opt = spec.cls([a], lr=1e-2)
    for _ in range(3):
        a.grad = torch.randn_like(a)
        opt.step()
    before = {k: v.clone() for k, v in opt.state[a].items() if isinstance(v, torch.Tensor)}
    opt.add_param_group({"params": [b], "lr": 1e-2})
    assert all(torch.equal(opt.state[a][k], v) for k, v in before.items())
    start = b.detach().clone()
    for _ in range(3):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
    assert not torch.equal(b, start) and opt.param_groups[1]["step"] == 3


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_parameters_made_trainable_later_are_picked_up(spec):
    dtype = param_dtype(spec.name)
    a = torch.nn.Parameter(torch.randn(8, 8, dtype=dtype))
    b = torch.nn.Parameter(torch.randn(8, 8, dtype=dtype), requires_grad=False)
    opt = spec.cls([a, b], lr=1e-3)
    for _ in range(3):
        a.grad = torch.randn_like(a)
        opt.step()
    before = {k: v.clone() for k, v in opt.state[a].items() if isinstance(v, torch.Tensor)}
    b.requires_grad_(True)
    start = b.detach().clone()
    opt._group_packs(opt.param_groups[0])  # what the next step() does on seeing b: a keeps its state bit for bit
    assert all(torch.equal(opt.state[a][k], v) for k, v in before.items())
    for _ in range(3):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
    assert not torch.equal(b, start) and len(opt.state[b]) > 0


def test_stats_through_accelerate_wrapper():
    """sd_hina_plugin.stats() reaches the optimizer inside accelerate's AcceleratedOptimizer."""
    import accelerate

    import sd_hina_plugin

    model = torch.nn.Linear(4, 4)
    opt = sd_hina_plugin.Automagic_CameAMP(model.parameters(), lr=1e-3)
    accelerator = accelerate.Accelerator(cpu=True)
    model, wrapped = accelerator.prepare(model, opt)
    assert not hasattr(wrapped, "stats")
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        wrapped.step()
        wrapped.zero_grad()
    scalars = sd_hina_plugin.stats(wrapped)
    assert scalars == opt.stats() and any(k.startswith("hina/lr/") for k in scalars)
    with pytest.raises(TypeError, match="not .*an sd_hina_plugin optimizer"):
        sd_hina_plugin.stats(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_diffusers_style_adamw_keywords(spec):
    """optimizer_cls(params, lr=, betas=(b1, b2), weight_decay=, eps=), as diffusers' and HF scripts call it."""
    dtype = param_dtype(spec.name)
    p = torch.nn.Parameter(torch.randn(8, 8, dtype=dtype))
    opt = spec.cls([p], lr=1e-4, betas=(0.85, 0.995), weight_decay=1e-2, eps=1e-7)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    group = opt.param_groups[0]
    if "betas" in spec.config.FIELDS:
        assert tuple(group["betas"][:2]) == (0.85, 0.995)
        if len(group["betas"]) == 3:  # CameAMP: b3 keeps its default, eps is the final denominator's
            assert group["betas"][2] == spec.config.FIELDS["betas"].default[2] and group["eps"][2] == 1e-7
        else:
            assert group["eps"] == 1e-7
    else:  # Automagic_Sinkgd: beta1 = b1; b2 and eps have no role, which it says
        assert group["beta1"] == 0.85
        assert any("b2 unused" in n for n in opt.notes()) and any("eps has no effect" in n for n in opt.notes())
    assert torch.isfinite(p).all()


def test_an_open_iteration_does_not_carry_into_a_loaded_state(tmp_path):
    """An engine that steps one group per call (DeepSpeed, here its calling pattern on a one-rank process group)
    leaves an iteration open when a later group's call fails; loading a checkpoint then must start clean: the
    abandoned sums were folded into the loaded C-Optim context at the next call (one update too many)."""
    from sd_hina_plugin import Automagic_CameAMP_COptim

    dist = _one_rank(tmp_path)

    def run(interrupt: bool):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8, 8))
        opt = Automagic_CameAMP_COptim([{"params": [a]}, {"params": [b]}], lr=1e-3)
        opt._binding.partitioned = True  # (what finding DeepSpeed's partitions sets: sums completed across ranks)
        groups = list(opt.param_groups)
        gen = torch.Generator().manual_seed(1)
        grads = [(torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)) for _ in range(6)]

        def iteration(i: int, only_first: bool = False):
            a.grad, b.grad = grads[i]
            for group in groups[:1] if only_first else groups:
                opt.param_groups = [group]
                opt.step()
            opt.param_groups = groups

        for i in range(3):
            iteration(i)
        saved, weights = copy.deepcopy(opt.state_dict()), (a.detach().clone(), b.detach().clone())  # (as on disk)
        if interrupt:
            iteration(5, only_first=True)  # the second group's call never came
        opt.load_state_dict(saved)
        with torch.no_grad():
            a.copy_(weights[0])
            b.copy_(weights[1])
        for i in range(3, 5):
            iteration(i)
        return opt.c_optim.steps, opt.c_optim.t["hist"].clone()

    try:
        clean, interrupted = run(False), run(True)
    finally:
        dist.destroy_process_group()
    assert clean[0] == interrupted[0] == 4  # 5 iterations, the first only initialises
    assert torch.equal(clean[1], interrupted[1])


def test_coptim_closure_with_an_empty_first_group():
    from sd_hina_plugin import Automagic_CameAMP_COptim

    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = Automagic_CameAMP_COptim([{"params": []}, {"params": [w]}], lr=1e-3)

    def closure():
        opt.zero_grad()
        loss = w.square().sum()
        loss.backward()
        return loss

    for _ in range(3):
        assert opt.step(closure) is not None
    assert opt.c_optim.losses == 2  # fed from the second step on (the first only initialises the context)
