"""Small real adapter networks: LyCORIS (create_lycoris and the kohya entry point), PEFT, and a kohya-style
LoRA network that names its modules exactly as kohya's networks/lora.py and lora_flux.py do."""

from __future__ import annotations

import torch
from torch import nn


def base_module() -> nn.Module:
    """The layers the reference name dumps were made from: Linear(64,128), Conv(8,16,3), Conv(16,32,1), Linear(320,640)."""
    return nn.Sequential(nn.Linear(64, 128), nn.Conv2d(8, 16, 3), nn.Conv2d(16, 32, 1), nn.Linear(320, 640))


class Transformer2DModel(nn.Module):  # class names are what LyCORIS' kohya network matches
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(32, 64)
        self.to_q = nn.Linear(64, 64)
        self.proj_out = nn.Linear(64, 32)


class ResnetBlock2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3)
        self.conv_shortcut = nn.Conv2d(8, 16, 1)


class CrossAttnDownBlock2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.attentions = nn.ModuleList([Transformer2DModel()])
        self.resnets = nn.ModuleList([ResnetBlock2D()])


class TinyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3)
        self.down_blocks = nn.ModuleList([CrossAttnDownBlock2D()])


class CLIPMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 128)
        self.fc2 = nn.Linear(128, 32)


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = CLIPMLP()


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Layer()])


class _TextModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _Encoder()


class TinyTextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.text_model = _TextModel()


# -- kohya networks/lora.py, reduced to what names and shapes depend on -----------------------------------

class KohyaLoRAModule(nn.Module):
    """kohya's LoRAModule: lora_down / lora_up (Linear or Conv2d), an ``alpha`` buffer, and ``lora_name``.
    With ``split`` > 1 (lora_flux split qkv) down and up are ModuleLists: ``lora_down.0.weight`` ..."""

    def __init__(self, lora_name: str, org: nn.Module, rank: int = 4, split: int = 1):
        super().__init__()
        self.lora_name = lora_name
        conv = isinstance(org, nn.Conv2d)

        def down():
            if conv:
                return nn.Conv2d(org.in_channels, rank, org.kernel_size, org.stride, org.padding, bias=False)
            return nn.Linear(org.in_features, rank, bias=False)

        def up(out):
            return nn.Conv2d(rank, out, 1, bias=False) if conv else nn.Linear(rank, out, bias=False)

        out = org.out_channels if conv else org.out_features
        if split > 1:
            self.lora_down = nn.ModuleList([down() for _ in range(split)])
            self.lora_up = nn.ModuleList([up(out // split) for _ in range(split)])
            for m in self.lora_up:
                nn.init.zeros_(m.weight)
        else:
            self.lora_down = down()
            self.lora_up = up(out)
            nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(rank)))


class KohyaLoRANetwork(nn.Module):
    """Names as kohya's create_network + apply_to produce them (prefix + module path, dots to underscores)."""

    def __init__(self, unet: nn.Module, text_encoders: list[nn.Module], split_qkv: bool = False):
        super().__init__()
        self.unet_loras, self.text_encoder_loras = [], []
        te_prefixes = ["lora_te"] if len(text_encoders) == 1 else [f"lora_te{i + 1}" for i in range(len(text_encoders))]
        for prefix, root, store in [("lora_unet", unet, self.unet_loras)] + [
                (p, te, self.text_encoder_loras) for p, te in zip(te_prefixes, text_encoders)]:
            for path, child in root.named_modules():
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    name = f"{prefix}.{path}".replace(".", "_")
                    split = 3 if split_qkv and path.endswith("to_q") else 1
                    store.append(KohyaLoRAModule(name, child, split=split))
        for lora in self.text_encoder_loras + self.unet_loras:
            self.add_module(lora.lora_name, lora)

    def prepare_optimizer_params(self, text_encoder_lr: float, unet_lr: float, loraplus_ratio: float | None = None):
        """kohya's groups: dicts with ``dict_values`` params and an lr; LoRA+ puts every lora_up in a "plus" group."""
        groups, descriptions = [], []
        for loras, lr, desc in ((self.text_encoder_loras, text_encoder_lr, "textencoder"), (self.unet_loras, unet_lr, "unet")):
            plain, plus = {}, {}
            for lora in loras:
                for pname, p in lora.named_parameters():
                    (plus if loraplus_ratio and "lora_up" in pname else plain)[f"{lora.lora_name}.{pname}"] = p
            groups.append({"params": plain.values(), "lr": lr})
            descriptions.append(desc)
            if plus:
                groups.append({"params": plus.values(), "lr": lr * loraplus_ratio})
                descriptions.append(f"{desc} plus")
        return groups, descriptions
