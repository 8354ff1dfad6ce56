"""A diffusers training loop as users write it: UNet2DConditionModel + add_adapter (PEFT LoRA) under accelerate with
gradient accumulation, a warm-up scheduler, save_state / load_state, and bf16 autocast over fp32 master weights."""

from __future__ import annotations

import pytest
import torch

import sd_hina_plugin

diffusers = pytest.importorskip("diffusers")
accelerate = pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")


def _unet():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return unet


def _batches(n=12):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 4, 8, 8, generator=gen), torch.randint(0, 1000, (2,), generator=gen),
             torch.randn(2, 3, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)) for _ in range(n)]


def _run(name, batches, state_in=None, state_out=None, mixed="no"):
    from diffusers.optimization import get_scheduler

    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2, mixed_precision=mixed)
    unet = _unet()
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    opt = sd_hina_plugin.create_optimizer(name, named, lr=1e-3)
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=2)
    unet, opt, sched = accelerator.prepare(unet, opt, sched)
    if state_in is not None:
        accelerator.load_state(state_in)
    losses = []
    for latents, t, text, noise in batches:
        with accelerator.accumulate(unet):
            pred = unet(latents, t, encoder_hidden_states=text).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
        losses.append(loss.item())
    if state_out is not None:
        accelerator.save_state(state_out)
    lora = {n: p.detach().clone() for n, p in accelerator.unwrap_model(unet).named_parameters() if "lora" in n}
    return lora, losses, opt


@pytest.mark.parametrize("name", ["HinaAdamWOptimizer", "Automagic_CameAMP"])
def test_diffusers_unet_lora_under_accelerate_resumes_exactly(tmp_path, name):
    batches = _batches()
    whole, _, opt = _run(name, batches)
    assert sd_hina_plugin.stats(opt)  # the scalars through AcceleratedOptimizer
    _run(name, batches[:6], state_out=tmp_path / "state")
    resumed, _, _ = _run(name, batches[6:], state_in=tmp_path / "state")
    assert whole.keys() == resumed.keys() and whole
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0, msg=key)
    start = _unet()
    moved = [not torch.equal(whole[n], p) for n, p in start.named_parameters() if n in whole]
    assert any(moved)


def test_bf16_autocast_over_fp32_master_weights():
    """mixed_precision='bf16': the forward runs in bf16 autocast, the optimizer keeps and updates fp32 weights."""
    lora, losses, opt = _run("Automagic_CameAMP", _batches(8), mixed="bf16")
    assert all(p.dtype == torch.float32 for p in lora.values())
    assert all(torch.isfinite(torch.tensor(losses)))
