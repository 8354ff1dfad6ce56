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


def test_state_lr_mask_and_avg_lr_read_as_in_the_upstream(capsys):
    """seed 001/000 loops over optimizer.state: 'lr_mask' is the per-element lr in lr units, 'avg_lr' its mean;
    neither is stored (checkpoints hold the real state only)."""
    optimizer = _trained(sd_hina_plugin.Automagic_CameAMP, steps=6, warmup_steps=4)
    printed = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                state = optimizer.state[p]
                if 'lr_mask' in state:
                    lr_mask = state['lr_mask']
                    print(f"LR 範圍: {lr_mask.min():.6f} - {lr_mask.max():.6f}")
                    printed += 1
                if 'avg_lr' in state:
                    print(f"avg_lr = {state['avg_lr']:.2e}")
    assert printed == sum(len(g["params"]) for g in optimizer.param_groups)
    assert "LR 範圍: 0.0000" in capsys.readouterr().out
    p = optimizer.param_groups[0]["params"][0]
    lr = optimizer.param_groups[0]["lr"]
    torch.testing.assert_close(optimizer.state[p]["lr_mask"], optimizer.lr_mask(p) * lr)
    torch.testing.assert_close(optimizer.state[p]["avg_lr"], (optimizer.lr_mask(p) * lr).mean())
    assert not (optimizer.state[p]["lr_mask"] == lr).all()  # the mask moved
    assert "lr_mask" not in optimizer.state[p].keys() and optimizer.state[p].get("avg_lr") is not None
    saved = optimizer.state_dict()["state"]
    assert all(type(s) is dict and "lr_mask" not in s and "avg_lr" not in s for s in saved.values())
    # without an lr mask the keys are absent, as in the upstream's AdamW names
    plain = _trained(sd_hina_plugin.HinaAdamWCore, steps=1)
    q = plain.param_groups[0]["params"][0]
    assert "lr_mask" not in plain.state[q] and plain.state[q].get("lr_mask") is None


def test_get_custom_adamw_optimizer_and_param_name_attributes():
    """seed 002: the convenience function, and LoRA detection from a param_name attribute on each parameter."""
    torch.manual_seed(0)
    net = KohyaLoRANetwork(TinyUNet(), [TinyTextEncoder()])
    params = []
    for name, p in net.named_parameters():
        p.param_name = name
        params.append(p)
    optimizer = sd_hina_plugin.get_custom_adamw_optimizer(params, lr=1e-3, optimizer_kwargs={"use_spd": True, "use_alora": True})
    assert isinstance(optimizer, sd_hina_plugin.HinaAdamWOptimizer) and optimizer.param_groups[0]["lr"] == 1e-3
    info = optimizer.get_optimization_info()
    assert info["lora"]["names_source"] == "param_name attributes"
    assert info["lora_stats"]["pairs"] > 0
    bare = sd_hina_plugin.get_custom_adamw_optimizer([torch.nn.Parameter(torch.randn(4, 4))])
    assert bare.param_groups[0]["lr"] == 1e-3 and bare.param_groups[0]["use_spd"] is True


def test_kohya_loraplus_groups_turn_our_ratio_off_with_a_note(caplog):
    """kohya's loraplus_lr_ratio puts up and down halves in separate groups: our LoRA+ is off, and says so."""
    torch.manual_seed(0)
    net = KohyaLoRANetwork(TinyUNet(), [TinyTextEncoder()])
    named = list(net.named_parameters())
    ups = [p for n, p in named if "lora_up" in n]
    rest = [p for n, p in named if "lora_up" not in n]
    with caplog.at_level("INFO", logger="sd_hina_plugin"):
        optimizer = sd_hina_plugin.HinaAdamWOptimizer([{"params": rest}, {"params": ups, "lr": 4e-4}], lr=1e-4)
        optimizer.attach_names(named)
    assert any("LoRA+ ratio (alora_ratio=21) is off" in n for n in optimizer.notes()), optimizer.notes()
    joined = _trained(sd_hina_plugin.HinaAdamWOptimizer, steps=1)
    assert not any("LoRA+" in n for n in joined.notes())


def test_avg_lr_after_loading_into_an_optimizer_that_stepped():
    """DCP's loader steps a fresh optimizer once (lr 0, zero gradients) before it loads the state in: past warm-up,
    hina/avg_lr must then read the loaded mask's mean, not the fresh one's (a frozen mask is not read again)."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Linear(16, 16)

    trained = model()
    opt = sd_hina_plugin.Automagic_CameAMP(trained.parameters(), lr=1e-3, warmup_steps=4)
    for _ in range(8):
        trained(torch.randn(4, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    saved = opt.state_dict()
    fresh = model()
    other = sd_hina_plugin.Automagic_CameAMP(fresh.parameters(), lr=1e-3, warmup_steps=4)
    for p in fresh.parameters():  # DCP's _init_optim_state: one step at lr 0 on zero gradients
        p.grad = torch.zeros_like(p)
    other.param_groups[0]["lr"] = 0.0
    other.step()
    other.load_state_dict(saved)
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(4, 16)
    for net, optimizer in ((trained, opt), (fresh, other)):
        net(x).square().mean().backward()
        optimizer.step()
    assert sd_hina_plugin.stats(other)["hina/avg_lr/group0"] == sd_hina_plugin.stats(opt)["hina/avg_lr/group0"]


def test_state_dict_leaves_the_live_param_groups_alone():
    """Without sharded parameters, state_dict() adds nothing to the optimizer's own param_groups (repr, logging
    of group hyperparameters)."""
    net = torch.nn.Linear(4, 4)
    opt = sd_hina_plugin.HinaAdamWCore(net.parameters(), lr=1e-3)
    keys = set(opt.param_groups[0])
    assert "hina" in opt.state_dict()["param_groups"][0]
    assert set(opt.param_groups[0]) == keys
