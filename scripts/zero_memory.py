"""Optimizer state per rank under DeepSpeed ZeRO-2 or FSDP2, on CPU (gloo), for every optimizer: the figures of
docs/multi_gpu.md.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 scripts/zero_memory.py            # 2 ranks, ZeRO-2
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 1 scripts/zero_memory.py            # 1 rank, the same model
    torchrun --nproc_per_node 2 scripts/zero_memory.py --engine fsdp2                # 2 ranks, fully_shard

The model is bench_step.py's LoRA set (200 rank-16 modules of 768 features, kohya names, 4.92 M parameters) in two
param groups (text encoder: the first 41 modules; U-Net: the other 159; odd counts, so that with 2 ranks a module of each group straddles the partition boundary). Each rank prints, per optimizer, its trained
elements, its optimizer state (``state_bytes()``: our state of this rank's tensors, replicas included) and the
elements it keeps as whole copies of tensors split between ranks; rank 0 prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import sd_hina_plugin

NAMES = ["HinaAdamWCore", "HinaAdamWOptimizer", "AdamW_HinaAdaptive", "Automagic_Sinkgd", "Automagic_CameAMP",
         "Automagic_CameAMP8bit", "Automagic_CameAMP_COptim8bit"]


class LoraSet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.down = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(16, 768, generator=gen) * 0.02) for _ in range(200)])
        self.up = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(768, 16, generator=gen) * 0.02) for _ in range(200)])

    def forward(self, x):
        return sum(x @ d.t() @ u.t() for d, u in zip(self.down, self.up))


def groups(model: LoraSet) -> list[dict]:
    out = []
    for part, modules in (("te", range(41)), ("unet", range(41, 200))):
        params, names = [], []
        for i in modules:
            params += [model.down[i], model.up[i]]
            names += [f"lora_{part}_block_{i}.lora_down.weight", f"lora_{part}_block_{i}.lora_up.weight"]
        out.append({"params": params, "param_names": names})
    return out


def fsdp2_rows(name: str) -> torch.Tensor:
    """(elements, state bytes, 0) of this rank under FSDP2: every tensor sharded along dim 0 by ``fully_shard``."""
    from torch.distributed.fsdp import fully_shard

    model = LoraSet()
    fully_shard(model)
    if name == "torch.AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        opt = sd_hina_plugin.create_optimizer(name, groups(model), lr=1e-4)
    for _ in range(2):
        model(torch.randn(2, 768)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    local = [p.to_local() for p in model.parameters()]
    if name == "torch.AdamW":
        nbytes = sum(v.to_local().numel() * v.element_size() for st in opt.state.values() for v in st.values()
                     if isinstance(v, torch.Tensor) and v.dim())
    else:
        nbytes = opt.state_bytes()
    return torch.tensor([sum(t.numel() for t in local), nbytes, 0], dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("zero2", "fsdp2"), default="zero2")
    engine_name = parser.parse_args().engine
    torch.set_num_threads(1)
    if engine_name == "fsdp2":
        dist.init_process_group("gloo")
    rows = []
    for name in (["torch.AdamW"] + NAMES if engine_name == "fsdp2" else NAMES):
        if engine_name == "fsdp2":
            row = fsdp2_rows(name)
            every = [torch.zeros_like(row) for _ in range(dist.get_world_size())]
            dist.all_gather(every, row)
            rows.append((name, every))
            continue
        import deepspeed

        model = LoraSet()
        opt = sd_hina_plugin.create_optimizer(name, groups(model), lr=1e-4)
        config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2 * int(os.environ.get("WORLD_SIZE", "1")),
                  "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        for _ in range(2):
            engine.backward(engine(torch.randn(2, 768)).square().mean())
            engine.step()
        members = [m for g in opt.param_groups for m in opt._binding.members(g)]
        replicas = [f for f in opt._binding.fragments() if f.kind == "replica"]
        row = torch.tensor([sum(m.numel() for m in members), opt.state_bytes(), sum(f.value.numel() for f in replicas)],
                           dtype=torch.float64)
        every = [torch.zeros_like(row) for _ in range(dist.get_world_size())]
        dist.all_gather(every, row)
        rows.append((name, every))
    if dist.get_rank() == 0:
        size = dist.get_world_size()
        print(f"| optimizer ({size} rank{'s' if size > 1 else ''}) | elements per rank | state MiB per rank | state B/element | replica elements per rank |")
        print("|---|---:|---:|---:|---:|")
        for name, every in rows:
            elems = "/".join(f"{int(r[0]):,}" for r in every)
            mib = "/".join(f"{r[1] / 2 ** 20:.1f}" for r in every)
            per = "/".join(f"{r[1] / r[0]:.2f}" for r in every)
            rep = "/".join(f"{int(r[2]):,}" for r in every)
            print(f"| {name} | {elems} | {mib} | {per} | {rep} |")
    dist.barrier()
    dist.destroy_process_group()  # before exit: gloo's threads torn down by the interpreter can abort a rank


if __name__ == "__main__":
    main()
