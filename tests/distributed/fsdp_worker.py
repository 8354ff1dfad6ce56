"""One rank of a real FSDP2 run (``torch.distributed.fsdp.fully_shard``) on CPU (gloo), launched by
tests/distributed/test_fsdp2.py with ``torchrun --nproc_per_node 2``; also the single-process reference (``--single``).

The model is LoRA-shaped with a few fully trained tensors, in two param groups with different lrs: kohya-named LoRA
pairs (Linear and Conv2d, so 2-D and 4-D weights), a GroupNorm's 1-D weight and bias, a trained conv and a 1-D
output scale. With 2 ranks FSDP2 cuts every tensor along dim 0, so ``lora_down`` of rank 1 leaves rank 1 an empty
shard and the tensors with an odd dim 0 (3, 5, 7) are split unevenly.

Each rank takes its half of every global batch; FSDP2 averages the gradients, so the single-process reference trains
on the whole batch and the two must agree to rounding. Orders (``--order``):

* ``shard-first``: ``fully_shard`` on the LoRA modules and the root, then the optimizer on ``model.parameters()``
  (DTensors), as torchtitan-style loops do;
* ``accelerate``: the optimizer on the plain parameters, then accelerate's own FSDP2 ``prepare``, which swaps
  each ``param_groups[i]["params"]`` for the sharded parameters (``fsdp2_switch_optimizer_parameters``). accelerate
  turns its FSDP plugin on only for accelerator devices (``AcceleratorState`` sets ``DistributedType.FSDP`` for
  MULTI_GPU/NPU/XPU/..., never for MULTI_CPU: on CPU the plugin is dropped and the model wrapped in DDP), so on CPU
  the worker sets what accelerate would have set on a GPU (``distributed_type = FSDP``, ``fsdp_plugin``) and then
  calls the real ``Accelerator.prepare``: everything after that is accelerate's code (``_prepare_fsdp2``: placeholder
  tensors in the groups, ``fsdp2_prepare_model``, ``fsdp2_switch_optimizer_parameters``).

Many optimizer variants run in one launch (``--variants``, a JSON file), each on a fresh model and a fresh process
group, so that a variant that fails on one rank only does not shift the next one's collectives. With
``--save DIR --save-at K`` each variant saves model and optimizer through ``torch.distributed.checkpoint``
(``get_state_dict`` / ``dcp.save``) before step K and trains on; with ``--load DIR --resume-from K`` it builds everything
fresh, loads (``dcp.load`` / ``set_state_dict``) and trains steps K.. . ``--single --load`` reads a checkpoint written
by 2 ranks in one process. A variant whose ranks deadlock (a collective past ``--timeout``) ends the launch's work:
the rest are reported "not run" and the test launches them again.

Rank 0 (or the single process) writes ``--out`` (per variant: the full, gathered trained parameters, fp32) and
``--out``.json (per variant: global losses, collectives issued inside ``optimizer.step()`` per step, bytes of
optimizer state and of parameters per rank, errors per rank, the optimizer's notes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import traceback
from collections import Counter

import torch
from torch import nn

BATCH = 8  # global batch; with 2 ranks each takes 4
IN_SHAPE = (3, 6, 6)
OUT_FEATURES = 7
GROUP_LRS = (2e-3, 1e-3)  # group 0: the text-encoder LoRA; group 1: the U-Net LoRA and the fully trained tensors


# -- model ----------------------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A frozen Linear with a kohya-style LoRA branch (lora_down / lora_up child modules)."""

    def __init__(self, base: nn.Linear, rank: int, gen: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        with torch.no_grad():  # lora_up not zero, so that both factors move from the first step
            self.lora_down.weight.copy_(torch.randn(self.lora_down.weight.shape, generator=gen) / base.in_features ** 0.5)
            self.lora_up.weight.copy_(torch.randn(self.lora_up.weight.shape, generator=gen) * 0.05)

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x))


class LoRAConv(nn.Module):
    """A frozen Conv2d with a kohya-style LoRA branch (lora_down with the base's kernel, lora_up 1x1)."""

    def __init__(self, base: nn.Conv2d, rank: int, gen: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        with torch.no_grad():
            fan_in = self.lora_down.weight[0].numel()
            self.lora_down.weight.copy_(torch.randn(self.lora_down.weight.shape, generator=gen) / fan_in ** 0.5)
            self.lora_up.weight.copy_(torch.randn(self.lora_up.weight.shape, generator=gen) * 0.05)

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x))


class UNetPart(nn.Module):
    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.conv_in = LoRAConv(nn.Conv2d(3, 5, 3, padding=1), 3, gen)  # down (3, 3, 3, 3), up (5, 3, 1, 1)
        self.norm = nn.GroupNorm(1, 5)  # trained 1-D weight and bias, dim 0 odd
        self.conv_out = nn.Conv2d(5, 4, 3, stride=2, padding=1)  # trained 4-D weight (4, 5, 3, 3) and bias (4,)

    def forward(self, x):
        return self.conv_out(torch.tanh(self.norm(self.conv_in(x))))


class TextPart(nn.Module):
    def __init__(self, gen: torch.Generator, extra: int = 0):
        super().__init__()
        self.fc1 = LoRALinear(nn.Linear(36, 24), 1, gen)  # lora_down (1, 36): rank 1 of 2 holds an empty shard
        self.fc2 = LoRALinear(nn.Linear(24, OUT_FEATURES), 4, gen)  # lora_up (7, 4): uneven shards
        # ``extra`` more LoRA modules shaped like fc1, beside it: more tensors, the same packs and shapes
        self.more = nn.ModuleList([LoRALinear(nn.Linear(36, 24), 1, gen) for _ in range(extra)])

    def forward(self, x):
        h = self.fc1(x)
        for m in self.more:
            h = h + m(x)
        return self.fc2(torch.tanh(h))


class Net(nn.Module):
    def __init__(self, extra: int = 0):
        super().__init__()
        torch.manual_seed(0)  # the frozen bases and the trained conv / norm: torch's own init, seeded
        gen = torch.Generator().manual_seed(1)
        self.unet = UNetPart(gen)
        self.te = TextPart(gen, extra)
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(OUT_FEATURES, generator=gen))

    def forward(self, x):
        h = self.unet(x).flatten(1)
        return self.te(h) * self.scale


#: module path -> the kohya name of its LoRA (lora_unet_* / lora_te1_* as kohya's networks/lora.py names them)
KOHYA = {"unet.conv_in": "lora_unet_conv_in",
         "te.fc1": "lora_te1_text_model_encoder_layers_0_mlp_fc1",
         "te.fc2": "lora_te1_text_model_encoder_layers_0_mlp_fc2"}


def lora_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAConv))]


def adapter_name(fqn: str) -> str:
    """``te.fc1.lora_down.weight`` -> ``lora_te1_..._fc1.lora_down.weight``; other tensors keep their path."""
    for path, kohya in KOHYA.items():
        if fqn.startswith(path + ".lora_"):
            return kohya + fqn[len(path):]
    if fqn.startswith("te.more."):  # te.more.0.lora_up.weight -> lora_te1_..._layers_1_mlp_fc1.lora_up.weight
        index, _, rest = fqn[len("te.more."):].partition(".")
        return f"lora_te1_text_model_encoder_layers_{int(index) + 1}_mlp_fc1.{rest}"
    return fqn


def groups(model: nn.Module, names: bool = True) -> list[dict]:
    """Two groups: the text encoder's LoRA (lr 2e-3), the U-Net's LoRA and every fully trained tensor (lr 1e-3)."""
    out = []
    for i, keep in enumerate((lambda n: n.startswith("te."), lambda n: not n.startswith("te."))):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and keep(n)]
        group = {"params": [p for _, p in named], "lr": GROUP_LRS[i]}
        if names:
            group["param_names"] = [adapter_name(n) for n, _ in named]
        out.append(group)
    return out


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: the same on every rank and in every mode; each rank then takes its part."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, *IN_SHAPE, generator=gen)
    w = torch.randn(x[0].numel(), OUT_FEATURES, generator=torch.Generator().manual_seed(7)) / x[0].numel() ** 0.5
    return x.to(dtype), torch.sin(2.0 * x.flatten(1) @ w)


# -- optimizers -----------------------------------------------------------------------------------------------

def build_optimizer(name: str, kwargs: dict, param_groups: list[dict]) -> torch.optim.Optimizer:
    """``torch.AdamW`` is torch's own AdamW (the harness's control); any other name goes through our registry."""
    if name == "torch.AdamW":
        return torch.optim.AdamW(param_groups, **kwargs)
    import sd_hina_plugin

    return sd_hina_plugin.create_optimizer(name, param_groups, **kwargs)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state on this rank: every state tensor's storage once (a DTensor by its local shard)."""
    from sd_hina_plugin.diagnostics import state_bytes as measured

    return measured(opt)


def param_bytes(model: nn.Module) -> int:
    return sum(_local(p).numel() * p.element_size() for p in model.parameters() if p.requires_grad)


class StepCollectives:
    """Counts the collectives issued inside ``optimizer.step()``: torch's CommDebugMode sees c10d ops
    (``dist.all_reduce`` and friends, coalesced ones included) and functional collectives (DTensor
    redistributions); one entry per step, ``{op: count}``."""

    def __init__(self) -> None:
        self.steps: list[dict[str, int]] = []

    def step(self, opt: torch.optim.Optimizer) -> None:
        from torch.distributed.tensor.debug import CommDebugMode

        with CommDebugMode() as comm:
            opt.step()
        counts = Counter({str(getattr(op, "__name__", op)): n for op, n in comm.get_comm_counts().items()})
        self.steps.append(dict(counts))


# -- sharding -------------------------------------------------------------------------------------------------

def shard_first(model: Net, mesh) -> Net:
    """Each LoRA module its own FSDP unit, the rest (norm, trained conv, scale) the root's. Parameters stay gathered
    from forward to backward (fewer collectives on a slow CPU loop; the optimizer sees shards all the same: FSDP2
    reshards after backward)."""
    from torch.distributed.fsdp import fully_shard

    for path in lora_modules(model):
        fully_shard(model.get_submodule(path), mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


_ACCELERATOR = None


def accelerator():
    """One Accelerator per process (accelerate keeps its state per process), FSDP2 switched on by hand on CPU."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator, FullyShardedDataParallelPlugin
        from accelerate.utils import DistributedType

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["LoRALinear", "LoRAConv"],
                                                reshard_after_forward=False)
        acc = Accelerator(cpu=True, fsdp_plugin=plugin)
        if acc.distributed_type != DistributedType.FSDP:
            # accelerate dropped the plugin (CPU): set the three fields AcceleratorState.__init__ sets for an
            # accelerator device (state.py: distributed_type and fsdp_plugin, then PartialState's distributed_type,
            # which every later AcceleratorState() copies back)
            from accelerate.state import PartialState

            assert acc.distributed_type == DistributedType.MULTI_CPU, acc.distributed_type
            acc.state.distributed_type = DistributedType.FSDP
            acc.state.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        assert acc.is_fsdp2
        _ACCELERATOR = acc
    return _ACCELERATOR


# -- one variant ----------------------------------------------------------------------------------------------

def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trained tensor, gathered whole (a collective on every rank), as fp32 on the CPU."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            value = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
            out[n] = value.float().clone()
    return out


def run_variant(v: dict, opts, group) -> tuple[dict, dict]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[v.get("dtype", "fp32")]
    sharded = not opts.single
    order = v.get("order", opts.order)
    world = dist.get_world_size(group) if sharded else 1
    rank = dist.get_rank(group) if sharded else 0
    model = Net(v.get("extra", 0)).to(dtype)
    loop_opt = None  # what the loop calls step() on (accelerate's wrapper in that order)
    if not sharded:
        opt = build_optimizer(v["name"], v.get("kwargs", {}), groups(model))
    elif order == "shard-first":
        from torch.distributed.device_mesh import DeviceMesh

        shard_first(model, DeviceMesh.from_group(group, "cpu"))
        opt = build_optimizer(v["name"], v.get("kwargs", {}), groups(model))
    else:
        acc = accelerator()
        opt = build_optimizer(v["name"], v.get("kwargs", {}), groups(model))
        model, loop_opt = acc.prepare(model, opt)
        assert acc.is_fsdp2 and type(model).__name__.startswith("FSDP"), (acc.distributed_type, type(model))
        from accelerate.utils.fsdp_utils import _unwrap_optimizer

        opt = _unwrap_optimizer(loop_opt)  # what accelerate's own FSDP2 checkpointing hands to DCP
    loop_opt = loop_opt or opt
    start = 0
    if opts.load:  # a fresh model and optimizer, then the checkpoint
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=os.path.join(opts.load, v.get("checkpoint", v["id"])), process_group=group)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = opts.resume_from
    losses, counter = [], StepCollectives()
    for step in range(start, opts.steps):
        if opts.save and step == opts.save_at:  # a checkpoint in the middle of the run, which then goes on
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(opts.save, v["id"]), process_group=group)
        x, y = batch(step, dtype)
        if not sharded and opts.split > 1:  # one process, the gradient summed from equal parts (calibration)
            loss = 0.0
            for i in range(opts.split):
                part = slice(i * BATCH // opts.split, (i + 1) * BATCH // opts.split)
                piece = nn.functional.mse_loss(model(x[part]).float(), y[part]) / opts.split
                piece.backward()
                loss = loss + piece.detach()
        else:
            part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
            loss = nn.functional.mse_loss(model(x[part]).float(), y[part])
            if sharded and order == "accelerate":
                accelerator().backward(loss)
            else:
                loss.backward()
        if sharded and not opts.no_count:
            counter.step(loop_opt)
        else:
            loop_opt.step()
        loop_opt.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        if sharded:  # the global batch's loss: the mean of the ranks' equal parts
            dist.all_reduce(total, group=group)
            total /= world
        losses.append(float(total))
    meta = {"losses": losses, "collectives": counter.steps, "state_bytes": state_bytes(opt),
            "param_bytes": param_bytes(model), "optimizer": type(opt).__name__}
    if hasattr(opt, "notes"):
        meta["notes"] = list(opt.notes())
    return full_params(model), meta


def _timed_out(error: str) -> bool:
    """gloo's words for a collective that waited past the group's timeout: ranks that took different paths. After
    one, gloo's connections in this process are not reliable (later collectives fail with "pair closure")."""
    return "Timed out" in error or "timeout" in error.lower()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", required=True,
                        help="JSON file: a list of {id, name, kwargs, dtype ('fp32'/'bf16'), order (default --order), "
                             "extra (more LoRA modules beside te.fc1, default 0), checkpoint (its folder under --load, default id)}")
    parser.add_argument("--order", choices=["shard-first", "accelerate"], default="shard-first")
    parser.add_argument("--single", action="store_true", help="one process, no sharding: the reference")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save", help="checkpoint folder: save through DCP before step --save-at, then go on")
    parser.add_argument("--save-at", type=int, default=3)
    parser.add_argument("--load", help="checkpoint folder: load through DCP, then train from step --resume-from")
    parser.add_argument("--resume-from", type=int, default=3)
    parser.add_argument("--split", type=int, default=1,
                        help="with --single: sum the gradient from this many equal parts of the batch, to measure how "
                             "far rounding alone moves an optimizer's result (the floor of any sharded tolerance)")
    parser.add_argument("--no-count", action="store_true", help="do not count collectives inside step()")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds a collective may wait")
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    with open(opts.variants) as f:
        variants = json.load(f)

    rank, status, world = 0, None, 1
    if not opts.single:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=opts.timeout))
        rank, world = dist.get_rank(), dist.get_world_size()
        status = dist.new_group(backend="gloo")  # only for the exchange of outcomes below
    results, meta = {}, {}
    deadlocked = None
    for v in variants:
        if deadlocked:  # the test launches these again in a fresh process group
            meta[v["id"]] = {"error": f"not run: {deadlocked} deadlocked before it in this launch", "not_run": True}
            continue
        group = None
        if not opts.single:  # a fresh group per variant: one that fails on one rank only does not shift the next
            group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=opts.timeout))
        try:
            results[v["id"]], meta[v["id"]] = run_variant(v, opts, group)
            error = None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # reported to the test, which decides whether it was expected (DCP's
            # CheckpointException derives from BaseException)
            error = f"{type(exc).__name__}: {exc}"
            if os.environ.get("FSDP_WORKER_TRACEBACK"):
                traceback.print_exc()
        if opts.single:
            if error:
                meta[v["id"]] = {"error": error, "errors": [error]}
            else:  # the shapes of a sharded run's entries: one per rank
                for key in ("state_bytes", "param_bytes", "collectives"):
                    meta[v["id"]][key] = [meta[v["id"]][key]]
            continue
        errors = [None] * world
        dist.all_gather_object(errors, error, group=status)
        if any(errors):
            results.pop(v["id"], None)
            first = next(e for e in errors if e)
            meta[v["id"]] = {"error": first, "errors": errors}
            if any(e and _timed_out(e) for e in errors):
                deadlocked = v["id"]
                meta[v["id"]]["deadlocked"] = True
            continue
        numbers = [None] * world
        mine = meta[v["id"]]
        dist.all_gather_object(numbers, (mine["state_bytes"], mine["param_bytes"], mine["collectives"]), group=status)
        for i, key in enumerate(("state_bytes", "param_bytes", "collectives")):
            mine[key] = [n[i] for n in numbers]  # per rank (collectives: per rank, per step)
    if rank == 0:
        torch.save(results, opts.out)
        with open(opts.out + ".json", "w") as f:
            json.dump(meta, f, default=str)
    if not opts.single:
        if not deadlocked:
            dist.barrier(group=status)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
