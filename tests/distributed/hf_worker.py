"""One rank of HF Trainer + DeepSpeed ZeRO-2 + PEFT LoRA on CPU, launched by tests/distributed/test_deepspeed.py with
``torchrun --nproc_per_node 2``. Writes the LoRA weights (rank 0) and the logged losses to ``--out``."""

from __future__ import annotations

import argparse
import json
import os

import peft
import torch
import transformers

import sd_hina_plugin
from sd_hina_plugin import hf
from sd_hina_plugin.kohya.hook import unwrap

from ds_worker import shut_down


class TinyRegressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig()
        self.up = torch.nn.Linear(8, 32)
        self.mid = torch.nn.Linear(32, 32)
        self.down = torch.nn.Linear(32, 1)

    def forward(self, x, labels=None):
        out = self.down(torch.tanh(self.mid(torch.tanh(self.up(x))))).squeeze(-1)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--resume", help="a checkpoint folder of an earlier run to continue from")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = peft.get_peft_model(TinyRegressor(), peft.LoraConfig(r=4, target_modules=["up", "mid", "down"], lora_alpha=4))
    cls = getattr(sd_hina_plugin, opts.optimizer)
    deepspeed = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                 "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    args = transformers.TrainingArguments(
        output_dir=opts.dir, per_device_train_batch_size=4, max_steps=opts.steps, logging_steps=4, save_steps=opts.steps // 2,
        use_cpu=True, learning_rate=1e-2, lr_scheduler_type="constant_with_warmup", warmup_steps=3, report_to=[],
        disable_tqdm=True, deepspeed=deepspeed, seed=0, data_seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(),
                                   optimizer_cls_and_kwargs=(cls, {"lr": 1e-2}))
    hf.log_stats(trainer)
    trainer.train(resume_from_checkpoint=opts.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        torch.save(weights, opts.out)
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        with open(opts.out + ".json", "w") as f:
            json.dump({"logs": logs, "notes": unwrap(trainer.optimizer).notes(), "stats": sd_hina_plugin.stats(trainer.optimizer)},
                      f, default=str)
    shut_down()


if __name__ == "__main__":
    main()
