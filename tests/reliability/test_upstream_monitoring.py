"""Monitoring code written for the upstream fork (its documents' snippets, unchanged) runs against our classes."""

from __future__ import annotations

import io

import torch
from adapter_networks import KohyaLoRANetwork, TinyTextEncoder, TinyUNet

import sd_hina_plugin


def _trained(cls, steps=3, **kwargs):
    torch.manual_seed(0)
    net = KohyaLoRANetwork(TinyUNet(), [TinyTextEncoder()])
    named = list(net.named_parameters())
    optimizer = cls([p for _, p in named], lr=1e-4, **kwargs).attach_names(named)
    for _ in range(steps):
        for _, p in named:
            p.grad = torch.randn_like(p) * 0.01
        optimizer.step()
    return optimizer


def test_get_optimization_info_keys_of_the_upstream(capsys):
    optimizer = _trained(sd_hina_plugin.HinaAdamWOptimizer)
    # seed 002, "monitoring and debugging"
    opt_info = optimizer.get_optimization_info()
    print(f"優化器類型: {opt_info['optimizer_type']}")
    print(f"總參數數量: {opt_info['total_params']}")
    print(f"啟用功能: {opt_info['features']}")
    print(f"LoRA 統計: {opt_info['lora_stats']}")
    for group_idx, metadata in optimizer.param_groups_metadata.items():
        print(f"組 {group_idx} LoRA 配對: {len(metadata['lora_pairs'])}")
    out = capsys.readouterr().out
    assert "HinaAdamWOptimizer" in out and "LoRA 配對: " in out
    assert opt_info["lora_stats"]["pairs"] == sum(len(m["lora_pairs"]) for m in optimizer.param_groups_metadata.values()) > 0
    assert opt_info["features"]["spd"] is True and opt_info["features"]["orthograd"] is False

    # seed 003: the adaptive optimizer's info, with training statistics
    info = _trained(sd_hina_plugin.AdamW_HinaAdaptive, optim_bits=32).get_optimization_info()
    print("優化器類型:", info['optimizer_type'])
    print("啟用功能:", info['features'])
    print("訓練統計:", info.get('training_stats', {}))
    assert info["training_stats"]["global_step"] == 3
    # seed 004: LoKr statistics (empty for a LoRA network)
    print(f"LoKr 參數: {info['lokr_stats']}")


def test_group_lr_and_magic_version_of_the_upstream(capsys):
    optimizer = _trained(sd_hina_plugin.Automagic_CameAMP, steps=6, warmup_steps=4)
    step = 100
    # seed 001, "monitoring"
    if step % 100 == 0:
        avg_lr = optimizer._get_group_lr(optimizer.param_groups[0])
        print(f"平均學習率: {avg_lr:.6f}")
    logged = optimizer.stats()[f"hina/avg_lr/{optimizer.group_name(0)}"]
    assert abs(avg_lr / logged - 1) < 1e-5 and avg_lr != optimizer.param_groups[0]["lr"]  # the mask moved
    buffer = io.BytesIO()
    torch.save({"optimizer_state_dict": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    # seed 001, "checkpoints"
    if 'magic_version' in checkpoint['optimizer_state_dict']:
        version = checkpoint['optimizer_state_dict']['magic_version']
        print(f"載入的優化器版本: {version}")
    assert "載入的優化器版本: 1" in capsys.readouterr().out
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])


def test_role_techniques_report_off_when_no_adapter_module_is_found():
    """Hand-made groups without names (every tensor 'regular'): LoRA+/ALoRA are reported off, with the reason."""
    weights = [torch.nn.Parameter(torch.randn(32, 32)), torch.nn.Parameter(torch.randn(32))]
    info = sd_hina_plugin.HinaAdamWOptimizer([{"params": weights[:1]}, {"params": weights[1:], "lr": 1e-3}],
                                             lr=1e-4).get_optimization_info()
    notes = info["lora"]["role_techniques"]
    assert notes and all(v.startswith("off: no LoRA/LoKr/LoHa module found") for v in notes.values()), notes
    named = _trained(sd_hina_plugin.HinaAdamWOptimizer, steps=1).get_optimization_info()["lora"]["role_techniques"]
    assert "on" in named.values(), named
