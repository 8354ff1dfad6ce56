"""Every module of real LyCORIS, PEFT and kohya-style networks is paired and every role is right."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from adapter_networks import KohyaLoRANetwork, TinyTextEncoder, TinyUNet, base_module
from support import RoleScaledAdamW

from sd_hina_plugin.lora import Role

lycoris = pytest.importorskip("lycoris")

# What each name suffix must be classified as, written out independently of the classifier.
EXPECTED = [
    (r"\.lora_down(\.\d+)?\.weight$", Role.LORA_A), (r"\.lora_up(\.\d+)?\.weight$", Role.LORA_B),
    (r"\.lora_mid\.weight$", Role.LORA_MID),
    (r"\.lora_A\.default\.weight$", Role.LORA_A), (r"\.lora_B\.default\.weight$", Role.LORA_B),
    (r"\.lora_magnitude_vector\.default\.weight$", Role.MAGNITUDE), (r"\.dora_scale$", Role.MAGNITUDE),
    (r"\.scalar$", Role.SCALAR),
] + [(rf"\.lokr_{s}(\.default)?$", Role(f"lokr_{s}")) for s in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")] \
  + [(rf"\.hada_{s}(\.default)?$", Role(f"hada_{s}")) for s in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")]


def expected_role(name: str) -> Role:
    for pattern, role in EXPECTED:
        if re.search(pattern, name):
            return role
    raise AssertionError(f"test table has no entry for {name}")


def check(named: list[tuple[str, torch.nn.Parameter]], modules: int, family: str):
    params = [p for _, p in named]
    opt = RoleScaledAdamW(params).attach_names(named)
    diag = opt.diagnose_lora_pairing()
    assert diag["names_source"] == "attach_names"
    assert diag["unpaired"] == [] and diag["duplicates"] == []
    assert diag["modules"][family] == modules, diag["modules"]
    for entry in diag["parameters"]:
        assert entry["role"] == expected_role(entry["name"]).value, entry
    paired = {n for pair in diag["pairs"] for n in list(pair["members"].values()) + list(pair["extras"].values())}
    assert paired == {n for n, _ in named}  # every parameter belongs to a complete module
    return opt


LYCORIS_CASES = {
    "lokr-default": dict(algo="lokr", linear_dim=4, linear_alpha=1),
    "lokr-decompose-tucker": dict(algo="lokr", linear_dim=2, linear_alpha=1, factor=8, decompose_both=True, use_tucker=True),
    "lokr-full-matrix": dict(algo="lokr", linear_dim=100000, linear_alpha=1, factor=4, full_matrix=True),
    "lokr-dora-scalar": dict(algo="lokr", linear_dim=4, linear_alpha=1, factor=8, dora_wd=True, use_scalar=True),
    "lora": dict(algo="lora", linear_dim=4, linear_alpha=1),
    "locon": dict(algo="locon", linear_dim=4, linear_alpha=1),
    "lora-tucker": dict(algo="lora", linear_dim=4, linear_alpha=1, use_tucker=True),
    "loha": dict(algo="loha", linear_dim=4, linear_alpha=1),
    "loha-tucker": dict(algo="loha", linear_dim=4, linear_alpha=1, use_tucker=True),
}


@pytest.mark.parametrize("case", LYCORIS_CASES, ids=list(LYCORIS_CASES))
def test_create_lycoris(case):
    from lycoris import create_lycoris

    kwargs = dict(LYCORIS_CASES[case])
    net = create_lycoris(base_module(), 1.0, kwargs.pop("linear_dim"), kwargs.pop("linear_alpha"), **kwargs)
    net.apply_to()
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert all(n.startswith("lycoris_") for n, _ in named)
    family = {"lokr": "lokr", "loha": "loha"}.get(LYCORIS_CASES[case]["algo"], "lora")
    check(named, 4, family)


@pytest.mark.parametrize("algo, kwargs", [("lokr", {"factor": 8}), ("lora", {}), ("loha", {})])
def test_lycoris_kohya_entry_point(algo, kwargs):
    import lycoris.kohya

    unet, te = TinyUNet(), TinyTextEncoder()
    net = lycoris.kohya.create_network(1.0, 4, 1, None, te, unet, algo=algo, **kwargs)
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert any(n.startswith("lora_unet_") for n, _ in named) and any(n.startswith("lora_te_") for n, _ in named)
    check(named, len({n.rsplit(".", 2 if algo == "lora" else 1)[0] for n, _ in named}), {"lokr": "lokr", "loha": "loha"}.get(algo, "lora"))


PEFT_CASES = ["lora", "dora", "lokr", "lokr-decompose", "loha"]


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft(case):
    peft = pytest.importorskip("peft")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.conv, self.big = torch.nn.Linear(64, 128), torch.nn.Conv2d(8, 16, 3), torch.nn.Linear(320, 640)

    targets = ["lin", "big"] if case == "dora" else ["lin", "conv", "big"]
    config = {
        "lora": lambda: peft.LoraConfig(r=4, target_modules=targets),
        "dora": lambda: peft.LoraConfig(r=4, target_modules=targets, use_dora=True),
        "lokr": lambda: peft.LoKrConfig(r=4, target_modules=targets),
        "lokr-decompose": lambda: peft.LoKrConfig(r=2, target_modules=targets, decompose_both=True, decompose_factor=8),
        "loha": lambda: peft.LoHaConfig(r=4, target_modules=targets),
    }[case]()
    model = peft.get_peft_model(Model(), config)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    family = {"lokr": "lokr", "lokr-decompose": "lokr", "loha": "loha"}.get(case, "lora")
    check(named, len(targets), family)


def test_kohya_style_networks_sd_sdxl_flux():
    unet = TinyUNet()
    sd = KohyaLoRANetwork(unet, [TinyTextEncoder()])
    opt = check(list(sd.named_parameters()), len(sd.unet_loras) + len(sd.text_encoder_loras), "lora")
    assert any(n.startswith("lora_te_") for n in opt.lora.params)
    sdxl = KohyaLoRANetwork(TinyUNet(), [TinyTextEncoder(), TinyTextEncoder()])
    assert {n.split("_")[1] for n, _ in sdxl.named_parameters()} == {"unet", "te1", "te2"}
    check(list(sdxl.named_parameters()), len(sdxl.unet_loras) + len(sdxl.text_encoder_loras), "lora")
    flux = KohyaLoRANetwork(TinyUNet(), [TinyTextEncoder()], split_qkv=True)
    names = [n for n, _ in flux.named_parameters()]
    assert any(".lora_down.2.weight" in n for n in names)
    check(list(flux.named_parameters()), len(flux.unet_loras) + len(flux.text_encoder_loras) + 2, "lora")


def test_kohya_loraplus_groups_keep_pairs_and_are_detected():
    """kohya's LoRA+ puts every lora_up into a separate "plus" group: pairs still form, by name, across groups."""
    net = KohyaLoRANetwork(TinyUNet(), [TinyTextEncoder()])
    groups, _ = net.prepare_optimizer_params(5e-5, 1e-4, loraplus_ratio=4.0)
    opt = RoleScaledAdamW(groups, use_plus=True).attach_names(net.named_parameters())
    diag = opt.diagnose_lora_pairing()
    assert diag["unpaired"] == [] and len(diag["split_across_groups"]) == diag["modules"]["lora"]
    assert not next(t for t in opt.TECHNIQUES if t.name == "lora_plus").applies(opt)
    assert "kohya loraplus" in opt.get_optimization_info()["lora"]["role_techniques"]["lora_plus"]


def test_unnamed_parameters_fall_back_to_shape_rules_and_say_so(caplog):
    net = KohyaLoRANetwork(TinyUNet(), [TinyTextEncoder()])
    with caplog.at_level(logging.WARNING, logger="sd_hina_plugin"):
        opt = RoleScaledAdamW(net.parameters(), use_plus=True)
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert opt.lora.source in ("shape rules", "module scan")
    if opt.lora.source == "shape rules":
        assert "no parameter names" in caplog.text and "attach_names" in caplog.text
        assert opt.diagnose_lora_pairing()["modules"]["lora"] > 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sd_hina_plugin"):
        RoleScaledAdamW(net.parameters()).step()  # no role-dependent technique enabled: names are not needed
    assert "no parameter names" not in caplog.text


def test_torch_param_names_are_used():
    net = KohyaLoRANetwork(TinyUNet(), [TinyTextEncoder()])
    opt = RoleScaledAdamW(net.named_parameters())
    assert opt.lora.source == "param_names" and opt.diagnose_lora_pairing()["unpaired"] == []


def test_diffusers_and_peft_name_strings():
    from sd_hina_plugin.lora import pair

    names = [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.default.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.default.weight",
        "base_model.model.emb.lora_embedding_A.default", "base_model.model.emb.lora_embedding_B.default",
        "m.lora_A.other.weight", "m.lora_B.other.weight", "m.lora_A.default.weight", "m.lora_B.default.weight",
    ]
    result = pair(names)
    assert result.unpaired == [] and len([m for m in result.modules.values() if m.complete]) == 5
