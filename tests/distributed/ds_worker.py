"""One rank of a real DeepSpeed ZeRO run on CPU (gloo), launched by tests/distributed/test_deepspeed.py with
``torchrun --nproc_per_node 2``; also the single-process reference (``--single``).

A LoRA-shaped model in two param groups (a "text encoder" and a "U-Net", as kohya builds them), each rank a
different half of every global batch; DeepSpeed averages the gradients, so the single-process reference trains on
the whole batch. Writes the final trainable tensors (rank 0, or the single process) to ``--out``, and, with
``--save``/``--load``, goes through DeepSpeed's own save_checkpoint / load_checkpoint halfway.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch

import sd_hina_plugin

BATCH = 8  # global batch; each of the two ranks takes half


class LoraLinear(torch.nn.Module):
    def __init__(self, features: int, rank: int, gen: torch.Generator):
        super().__init__()
        self.base = torch.nn.Linear(features, features)
        self.base.requires_grad_(False)
        self.lora_down = torch.nn.Parameter(torch.randn(rank, features, generator=gen) / features ** 0.5)
        self.lora_up = torch.nn.Parameter(torch.randn(features, rank, generator=gen) * 0.01)

    def forward(self, x):
        return self.base(x) + x @ self.lora_down.t() @ self.lora_up.t()


class Model(torch.nn.Module):
    """te: 2 LoRA modules of width 24, rank 4; unet: 3 of width 40, rank 8, and a bias-like 1-D tensor."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.te = torch.nn.ModuleList([LoraLinear(24, 4, gen) for _ in range(2)])
        self.proj = torch.nn.Linear(24, 40)
        self.proj.requires_grad_(False)
        self.unet = torch.nn.ModuleList([LoraLinear(40, 8, gen) for _ in range(3)])
        self.unet_scale = torch.nn.Parameter(torch.ones(40))

    def forward(self, x):
        for m in self.te:
            x = torch.tanh(m(x))
        x = self.proj(x)
        for m in self.unet:
            x = torch.tanh(m(x))
        return x * self.unet_scale


def groups(model: Model) -> list[dict]:
    out = []
    for prefix in ("te", "unet"):
        named = [(n, p) for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]
        # kohya-style names, so that LoRA roles and pairs are found
        names = [f"lora_{prefix}_{n.split('.')[1]}.{n.split('.')[2]}.weight" if "lora_" in n else n for n, _ in named]
        out.append({"params": [p for _, p in named], "param_names": names, "lr": 2e-3 if prefix == "te" else 3e-3})
    return out


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 24, generator=gen)
    return x, torch.sin(x.sum(1, keepdim=True) * 0.3).expand(BATCH, 40).clone()


def build(name: str, model: Model, args: list[str]):
    return sd_hina_plugin.create_optimizer(name, groups(model), args=args)


def trained(model: Model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def single(name: str, steps: int, args: list[str]) -> dict[str, torch.Tensor]:
    model = Model()
    opt = build(name, model, args)
    for step in range(steps):
        x, y = batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return trained(model)


def zero(name: str, steps: int, args: list[str], stage: int, save: str | None, load: str | None,
         bf16: bool = False) -> tuple[dict, dict]:
    import deepspeed

    rank = int(os.environ["RANK"])
    model = Model().to(torch.bfloat16 if bf16 else torch.float32)
    opt = build(name, model, args)
    config = {"train_batch_size": BATCH // 2 * int(os.environ["WORLD_SIZE"]), "train_micro_batch_size_per_gpu": BATCH // 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
              "bf16": {"enabled": bf16}}
    engine, wrapped, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    start = 0
    if load:
        engine.load_checkpoint(os.path.join(load, name), tag="half")
        start = steps // 2
    for step in range(start, steps):
        x, y = batch(step)
        part = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        loss = torch.nn.functional.mse_loss(engine(x[part].to(model.unet_scale.dtype)).float(), y[part])
        engine.backward(loss)
        engine.step()
        if save and step + 1 == steps // 2:
            engine.save_checkpoint(os.path.join(save, name), tag="half")
            break
    # the model's parameters hold DeepSpeed's updated values (fp32 here, so equal to its master partitions)
    context = getattr(opt, "c_optim", None)  # C-Optim: context updates so far (once per iteration, not per group)
    return trained(model), {"distributed": opt.get_optimization_info()["distributed"], "notes": opt.notes(), "lora": opt.get_optimization_info()["lora"], "pairs": opt.diagnose_lora_pairing()["pairs"],
                            "context_updates": None if context is None else context.steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizers", required=True, help="comma-separated names")
    parser.add_argument("--args", default="", help="optimizer args for every name, ';'-separated")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="a bf16 model with DeepSpeed's bf16 setting")
    parser.add_argument("--save")
    parser.add_argument("--load")
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    args = [a for a in opts.args.split(";") if a]
    results, meta = {}, {}
    for name in opts.optimizers.split(","):
        try:
            if opts.single:
                results[name] = single(name, opts.steps, args)
            else:
                results[name], meta[name] = zero(name, opts.steps, args, opts.stage, opts.save, opts.load, opts.bf16)
        except Exception as error:  # reported to the test, which decides whether it was expected
            meta[name] = {"error": f"{type(error).__name__}: {error}"}
    if opts.single or int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, opts.out)
        with open(opts.out + ".json", "w") as f:
            json.dump(meta, f, default=str)
    if not opts.single:
        shut_down()


def shut_down() -> None:
    """Every rank waits until rank 0 has written, then the process group is destroyed before exit: left to the
    interpreter's exit, gloo's threads were once torn down mid-join (SIGABRT on one rank, torchrun then killing
    the other before it had written its results)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
