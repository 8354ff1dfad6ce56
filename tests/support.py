"""Shared test helpers: a small kohya-named LoRA problem, configs for every registered optimizer."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

import sd_hina_plugin
from sd_hina_plugin import registry
from sd_hina_plugin.bench.tasks import LoRAConv, LoRALinear
from sd_hina_plugin.config import load_preset

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.toml"))


def suite_device() -> torch.device:
    """The device the conformance suite runs on: ``SD_HINA_TEST_DEVICE`` (e.g. ``cuda``), default the CPU.

    Only the conformance suite follows it (``scripts/device_check.sh`` runs it on a GPU); the other suites
    test CPU-side behaviour and build their tensors on the CPU."""
    device = torch.device(os.environ.get("SD_HINA_TEST_DEVICE", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"SD_HINA_TEST_DEVICE={device} but torch sees no CUDA device")
    return device


class TinyLoRANet(nn.Module):
    """Conv LoRA -> pooled -> two linear LoRAs, with a trainable 1-D scale (DoRA-magnitude-like)."""

    def __init__(self, rank: int = 4):
        super().__init__()
        self.conv = LoRAConv(nn.Conv2d(3, 8, 3, padding=1).requires_grad_(False), rank)
        self.fc1 = LoRALinear(nn.Linear(8 * 16, 32).requires_grad_(False), rank)
        self.fc2 = LoRALinear(nn.Linear(32, 16).requires_grad_(False), rank)
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = nn.functional.avg_pool2d(h, 2).flatten(1)
        h = torch.tanh(self.fc1(h))
        return self.fc2(h) * self.scale

    def lora_named_parameters(self):
        """Names as kohya's LoRA network reports them."""
        for module, name in ((self.conv, "lora_unet_conv_in"), (self.fc1, "lora_unet_mid_block_attn_to_q"),
                             (self.fc2, "lora_te1_text_model_encoder_layers_0_mlp_fc1")):
            yield f"{name}.lora_down.weight", module.lora_down.weight
            yield f"{name}.lora_up.weight", module.lora_up.weight
        yield "lora_unet_out.scale", self.scale


def lora_problem(seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(student, batches): fit the student's LoRA branches to a teacher with shifted weights. Built on the CPU
    (the same values on every device), then moved to ``device``."""
    torch.manual_seed(seed)
    student = TinyLoRANet()
    teacher = TinyLoRANet()
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        for module in (teacher.conv, teacher.fc1, teacher.fc2):
            module.base.weight.add_(0.3 * module.base.weight.std() * torch.randn_like(module.base.weight))
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randn(8, 3, 8, 8, generator=gen) for _ in range(4)]
    targets = [teacher(x).detach() for x in batches]
    student.to(device=device, dtype=dtype)
    return student, list(zip([b.to(device, dtype) for b in batches], [t.to(device, dtype) for t in targets]))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def loss_on(model: nn.Module, data) -> float:
    with torch.no_grad():
        return sum(nn.functional.mse_loss(model(x).float(), y.float()).item() for x, y in data) / len(data)


def train(model: nn.Module, opt: torch.optim.Optimizer, data, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        x, y = data[i % len(data)]
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x).float(), y.float()).backward()
        opt.step()


def roundtrip(obj):
    """torch.save then torch.load(weights_only=True), as a checkpoint on disk would be."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


PROBLEM_LR = 1e-3


def problem_lr(spec) -> float:
    """The lr the conformance problem trains with: 1e-3 for Adam-scale optimizers, or the class's
    ``CONFORMANCE_LR`` when its lr means something else.

    Defaults and presets suggest lrs for real SD/SDXL training; the tiny problem here needs one lr for every
    variant, so presets contribute their arguments, not their learning_rate.
    """
    return getattr(spec.cls, "CONFORMANCE_LR", PROBLEM_LR)


def problem_steps(name: str) -> int:
    """Steps of the loss-decrease check: 60, or the class's ``CONFORMANCE_STEPS`` for optimizers whose
    default early phase is deliberately conservative (documented on the class)."""
    return getattr(registry.resolve(name).cls, "CONFORMANCE_STEPS", 60)


def variants() -> list[tuple[str, str, dict, float]]:
    """(test id, optimizer name, kwargs, lr) for every registered optimizer and every preset.

    Each optimizer runs with its defaults; one with 8-bit state also with ``min_8bit_size=0`` so that the
    8-bit path covers the small test tensors; and each preset with its ``optimizer_args``.
    """
    out = []
    for spec in registry.specs():
        lr = problem_lr(spec)
        out.append((f"{spec.name}-defaults", spec.name, {}, lr))
        fields = spec.config.FIELDS
        if "min_8bit_size" in fields:
            kwargs = {"min_8bit_size": 0}
            if "optim_bits" in fields:
                kwargs["optim_bits"] = 8
            out.append((f"{spec.name}-all8bit", spec.name, kwargs, lr))
    for path in PRESETS:
        preset = load_preset(path)
        spec = registry.resolve(preset["optimizer_type"])
        config = spec.config.from_strings(preset["optimizer_args"])
        given = {a.partition("=")[0].strip() for a in preset["optimizer_args"]}
        out.append((f"{spec.name}-{path.stem}", spec.name, {k: getattr(config, k) for k in given}, problem_lr(spec)))
    return out


def param_dtype(name: str, wanted: torch.dtype = torch.float32) -> torch.dtype:
    """``wanted`` if the optimizer accepts it, else the first dtype it does accept."""
    allowed = registry.resolve(name).cls.PARAM_DTYPES
    return wanted if allowed is None or wanted in allowed else allowed[0]


def make(name: str, params, lr: float, **kwargs):
    return sd_hina_plugin.create_optimizer(name, params, lr=lr, **kwargs)


# -- LoRA-aware test double: the AdamW core plus every per-role scale technique, each behind a switch ---------

from sd_hina_plugin.config import Field  # noqa: E402
from sd_hina_plugin.engine.base import HinaOptimizer  # noqa: E402
from sd_hina_plugin.optimizers._declare import config_for  # noqa: E402
from sd_hina_plugin.techniques.adam import AdamNormalize, FirstMoment, SecondMoment  # noqa: E402
from sd_hina_plugin.techniques.apply import DecoupledWeightDecay, WriteParams  # noqa: E402
from sd_hina_plugin.techniques.lora_scales import AllLoraRowScale, AloraRowScale, LoraPlusRatio  # noqa: E402

USE_PLUS = Field("use_plus", "bool", False, "LoRA+ ratio")
USE_ALORA = Field("use_alora_rows", "bool", False, "ALoRA rows")
USE_ALLORA = Field("use_allora", "bool", False, "ALLoRA rows")


class RoleScaledAdamW(HinaOptimizer):
    """Not registered: exercises the per-role scale techniques on the AdamW core."""

    NAME = "RoleScaledAdamW"
    TECHNIQUES = (FirstMoment(), SecondMoment(), AdamNormalize(),
                  LoraPlusRatio(Field("alora_ratio", "float", 16.0, "LoRA+ ratio", low=0.0), switch=USE_PLUS),
                  AloraRowScale(switch=USE_ALORA),
                  AllLoraRowScale(Field("eta", "float", 2.0, "ALLoRA eta", low=0.0, low_open=True), switch=USE_ALLORA),
                  DecoupledWeightDecay(), WriteParams())
    Config = config_for(NAME, TECHNIQUES, defaults={"weight_decay": 0.0})


class LossObservingAdamW(sd_hina_plugin.HinaAdamWCore):
    """Not registered: records what the kohya hook feeds to ``observe_loss``."""

    def observe_loss(self, loss):
        self.observed = getattr(self, "observed", []) + [float(loss)]


class _Scratch:
    """What a step context asks of its optimizer: work buffers."""

    @staticmethod
    def _scratch(name, pack, dtype=torch.float32):
        return torch.empty(pack.total, dtype=dtype)


def step_context(tensors: list[torch.Tensor]):
    """A step context over one pack of ``tensors`` (planned as the engine plans them), for calling the engine's
    reduction primitives and techniques' kernels directly."""
    from sd_hina_plugin.engine.context import StepContext
    from sd_hina_plugin.engine.pack import plan_packs

    (pack,) = plan_packs(0, tensors, lambda numel: False)
    return StepContext(_Scratch(), pack, {"lr": 0.0, "step": 2}, torch.zeros(pack.total), {})
