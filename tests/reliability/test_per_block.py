"""One optimizer per block, each stepped from a backward hook: kohya's ``--fused_optimizer_groups`` (sdxl_train.py)
and ``--blockwise_fused_optimizers`` (flux_train.py), which never hold the whole gradient at once.

The instances share one scratch pool (``ScratchPool.shared``), so N of them hold about one optimizer's scratch,
not N times it; per-element optimizers give what one optimizer over all parameters gives; each instance's
state dict resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch

import sd_hina_plugin


def _blocks(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh()) for _ in range(6)])


def _hooked(model: torch.nn.Sequential, name: str, **kwargs) -> list:
    """kohya's pattern: an optimizer per block, stepped and zeroed in the hook of the block's last gradient."""
    optimizers = []
    for block in model:
        params = list(block.parameters())
        opt = sd_hina_plugin.create_optimizer(name, [{"params": params}], lr=1e-3, **kwargs)
        optimizers.append(opt)
        remaining = {"n": len(params)}

        def hook(tensor, opt=opt, remaining=remaining, total=len(params)):
            remaining["n"] -= 1
            if remaining["n"] == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
                remaining["n"] = total

        for p in params:
            p.register_post_accumulate_grad_hook(hook)
    return optimizers


def _data(step: int) -> torch.Tensor:
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(step))


# per-element and per-tensor work only (statistics across a group's tensors, as AdaDecay's, see other tensors per
# block than over the whole model)
@pytest.mark.parametrize("name", ["HinaAdamWCore", "HinaAdamWOptimizer"])
def test_per_block_instances_equal_one_optimizer_and_share_scratch(name):
    whole = _blocks()
    single = sd_hina_plugin.create_optimizer(name, [{"params": list(whole.parameters())}], lr=1e-3)
    for step in range(5):
        whole(_data(step)).square().mean().backward()
        single.step()
        single.zero_grad(set_to_none=True)
    one_pool = single._pool.nbytes()
    del single

    blocks = _blocks()
    optimizers = _hooked(blocks, name)
    for step in range(5):
        blocks(_data(step)).square().mean().backward()  # every optimizer steps inside backward
    assert len({id(o._pool) for o in optimizers}) == 1
    # the blocks are smaller than the whole, so their shared scratch is at most one optimizer's
    assert optimizers[0]._pool.nbytes() <= one_pool
    for a, b in zip(whole.parameters(), blocks.parameters()):
        # per block, the optimizer sees the same tensors with the same gradients (per-tensor techniques included)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_per_block_state_dicts_resume_exactly():
    blocks = _blocks()
    optimizers = _hooked(blocks, "Automagic_CameAMP8bit", min_8bit_size=0)
    for step in range(3):
        blocks(_data(step)).square().mean().backward()
    saved = [copy.deepcopy(o.state_dict()) for o in optimizers]  # (a state dict holds the live tensors)
    values = [p.detach().clone() for p in blocks.parameters()]
    for step in range(3, 6):
        blocks(_data(step)).square().mean().backward()
    twin = _blocks()
    with torch.no_grad():
        for p, v in zip(twin.parameters(), values):
            p.copy_(v)
    twins = _hooked(twin, "Automagic_CameAMP8bit", min_8bit_size=0)
    for opt, sd in zip(twins, saved):
        opt.load_state_dict(sd)
    for step in range(3, 6):
        twin(_data(step)).square().mean().backward()
    for a, b in zip(blocks.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_the_shared_pool_goes_with_the_last_optimizer():
    """Nothing is kept once no optimizer uses the pool (run alone: other tests' optimizers may still be alive here)."""
    import subprocess
    import sys

    code = (
        "import gc, torch, sd_hina_plugin\n"
        "from sd_hina_plugin.engine.pack import ScratchPool\n"
        "opt = sd_hina_plugin.HinaAdamWCore([torch.nn.Parameter(torch.randn(1000))], lr=1e-3)\n"
        "opt.param_groups[0]['params'][0].grad = torch.randn(1000)\n"
        "opt.step()\n"
        "other = sd_hina_plugin.Automagic_CameAMP([torch.nn.Parameter(torch.randn(10))], lr=1e-3)\n"
        "assert other._pool is opt._pool and opt._pool.nbytes() > 0\n"
        "del opt, other\n"
        "gc.collect()\n"
        "assert ScratchPool.shared().nbytes() == 0\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
