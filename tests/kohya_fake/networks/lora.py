"""kohya networks/lora.py reduced to names, shapes and prepare_optimizer_params' groups."""

import torch
from torch import nn


class LoRAModule(nn.Module):
    def __init__(self, lora_name, org, rank=4):
        super().__init__()
        self.lora_name = lora_name
        self.lora_down = nn.Linear(org.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, org.out_features, bias=False)
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(rank)))
        self.org_module = [org]  # a list, so that it is not registered as a submodule (as in kohya)

    def apply_to(self):
        """kohya: the original module's forward is replaced by the LoRA forward."""
        self.org_forward = self.org_module[0].forward
        self.org_module[0].forward = self.forward

    def forward(self, x):
        return self.org_forward(x) + self.lora_up(self.lora_down(x))


class LoRANetwork(nn.Module):
    def __init__(self, unet, text_encoder, loraplus_lr_ratio=None):
        super().__init__()
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.unet_loras, self.text_encoder_loras = [], []
        for prefix, root, store in (("lora_te", text_encoder, self.text_encoder_loras), ("lora_unet", unet, self.unet_loras)):
            for path, child in root.named_modules():
                if isinstance(child, nn.Linear):
                    store.append(LoRAModule(f"{prefix}.{path}".replace(".", "_"), child))

    def apply_to(self, text_encoder, unet):
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()
            self.add_module(lora.lora_name, lora)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        groups, descriptions = [], []
        for loras, lr, desc in ((self.text_encoder_loras, text_encoder_lr or default_lr, "textencoder"),
                                (self.unet_loras, unet_lr or default_lr, "unet")):
            plain, plus = {}, {}
            for lora in loras:
                for name, p in lora.named_parameters():
                    (plus if self.loraplus_lr_ratio and "lora_up" in name else plain)[f"{lora.lora_name}.{name}"] = p
            groups.append({"params": plain.values(), "lr": lr})
            descriptions.append(desc)
            if plus:
                groups.append({"params": plus.values(), "lr": lr * self.loraplus_lr_ratio})
                descriptions.append(desc + " plus")
        return groups, descriptions
