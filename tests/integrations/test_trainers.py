"""The recipes of the trainers users bring, with the real libraries and tiny models built here (no downloads)."""

from __future__ import annotations

import pytest
import torch

import sd_hina_plugin

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class TinyRegressor(torch.nn.Module):
    """A two-layer MLP with a Trainer-style forward: returns {"loss": ...} when labels are given."""

    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 1)

    def forward(self, x, labels=None):
        out = self.down(torch.tanh(self.up(x))).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out} if labels is not None else {"logits": out}


class Data(torch.utils.data.Dataset):
    def __init__(self, n=64):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = self.x[:, 0] * 0.5 - self.x[:, 1]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _full_loss(model) -> float:
    data = Data()
    with torch.no_grad():
        return float(model(data.x, labels=data.y)["loss"])


def _lora_model():
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, target_modules=["up", "down"], lora_alpha=4)
    return peft.get_peft_model(TinyRegressor(), config)


def _args(tmp_path, **kw):
    kw.setdefault("report_to", [])
    return transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=40,
                                          logging_steps=10, save_steps=20, use_cpu=True,
                                          learning_rate=1e-2, lr_scheduler_type="constant_with_warmup", warmup_steps=3,
                                          disable_tqdm=True, **kw)


@pytest.mark.parametrize("name", ["HinaAdamWOptimizer", "Automagic_CameAMP", "Automagic_Sinkgd"])
def test_hf_trainer_with_peft_lora_via_optimizer_cls_and_kwargs(tmp_path, name):
    """Trainer builds the optimizer itself from (class, kwargs): its decay / no-decay groups (the second one is
    empty under PEFT LoRA), AdamW-style keywords; training lowers the loss and resuming from a checkpoint works."""
    model = _lora_model()
    cls = sd_hina_plugin.resolve(name).cls
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=Data(),
                                   optimizer_cls_and_kwargs=(cls, {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8}))
    before = _full_loss(model)
    result = trainer.train()
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), cls)
    assert any(len(g["params"]) == 0 for g in trainer.optimizer.param_groups)  # Trainer's empty no-decay group
    assert _full_loss(model) < 0.9 * before
    assert result.global_step == 40
    # resume from the step-20 checkpoint: the optimizer state loads into a fresh optimizer of the same class
    resumed = transformers.Trainer(model=_lora_model(), args=_args(tmp_path), train_dataset=Data(),
                                   optimizer_cls_and_kwargs=(cls, {"lr": 1e-2}))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-20"))
    assert resumed.state.global_step == 40
    scalars = sd_hina_plugin.stats(resumed.optimizer)
    assert any(k.startswith("hina/lr/") and v > 0 for k, v in scalars.items()), scalars


def test_hf_trainer_with_a_prebuilt_optimizer_and_loraplus_groups(tmp_path):
    """optimizers=(opt, None) with peft's create_loraplus_optimizer groups (some of them empty)."""
    from peft.optimizers import create_loraplus_optimizer

    model = _lora_model()
    opt = create_loraplus_optimizer(model, sd_hina_plugin.HinaAdamWOptimizer, lr=1e-2, loraplus_lr_ratio=4.0)
    assert any(len(g["params"]) == 0 for g in opt.param_groups)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=Data(), optimizers=(opt, None))
    before = _full_loss(model)
    trainer.train()
    assert _full_loss(model) < 0.9 * before


def test_hf_trainer_logs_our_scalars_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import sd_hina_plugin.hf

    args = _args(tmp_path, report_to=["tensorboard"])
    trainer = transformers.Trainer(model=_lora_model(), args=args, train_dataset=Data(),
                                   optimizer_cls_and_kwargs=(sd_hina_plugin.Automagic_CameAMP, {"lr": 1e-2}))
    sd_hina_plugin.hf.log_stats(trainer)
    trainer.train()
    tags = set()
    for path in tmp_path.rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(path))
        events.Reload()
        tags |= set(events.Tags()["scalars"])
    assert any(t.startswith("train/hina/lr/") for t in tags) and any(t.startswith("train/hina/avg_lr/") for t in tags), tags
