"""Optimizer step cost: median ms/step, ratio to torch.optim.AdamW(foreach=True) in the same process (the median
of the per-round ratios, each round timing every optimizer once, with their quartiles),
dispatched ops, host syncs and host-to-device uploads per step, and state bytes per parameter.

Parameter sets (fp32 unless --dtype bf16):
  lora  200 x (16x768) + 200 x (768x16)  = 4.92 M params in 400 tensors (a rank-16 LoRA shape mix)
  full  3 x (4096x4096)                  = 50.3 M params in 3 tensors (full fine-tuning)

Optimizers are given as NAME[:key=value,...]: any registered sd_hina_plugin optimizer, or the baselines
torch.AdamW (foreach, the reference), torch.AdamW.fused, bnb.AdamW8bit. Each optimizer works on its own copy
of the parameters; steps are interleaved round-robin so machine load affects all of them alike.

    python scripts/bench_step.py --set lora --set full \
        --opt torch.AdamW.fused --opt bnb.AdamW8bit --opt HinaAdamWCore --opt HinaAdamWCore:optim_bits=8

Where a step's time goes: ``--ablate NAME[:k=v,...]`` times that optimizer and one copy per technique switch
of its class with that switch flipped (``use_spd=False``, ``use_orthogonal_grad=True``, ...), all in the same
rounds, so each row's difference to the first is what the switch costs in this process:

    python scripts/bench_step.py --set lora --ablate HinaAdamWOptimizer:optim_bits=32

``--compile`` adds, for every optimizer of this package, a row with ``compile=True`` (each pack's step compiled by
torch.compile; see docs/engine.md). Its warm-up is at least 5 steps, so that the graphs of the timed phase exist;
``warmup s`` is the time those first steps took (the compile time, with the first graphs' allocations). A compiled
step runs eagerly under the op counter (a dispatch mode), so its rows show no op count; syncs and uploads are
counted by torch.profiler instead:

    python scripts/bench_step.py --set lora --compile --opt HinaAdamWCore --opt AdamW_HinaAdaptive

``--module-dropout P`` times steps in which each LoRA module (a down/up pair) has no gradient with probability P,
as under kohya's ``module_dropout``:

    python scripts/bench_step.py --set lora --module-dropout 0.1 --opt HinaAdamWCore --opt HinaAdamWOptimizer:optim_bits=32

On CPU use one intra-op thread (the default here): two threads made small kernels slower on 2-core machines.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sd_hina_plugin  # noqa: E402
from sd_hina_plugin.bench.ablation import ablations as switch_ablations, format_spec, parse_spec  # noqa: E402
from sd_hina_plugin.diagnostics import count_step, profiled_counts, state_bytes  # noqa: E402

SETS = {
    "lora": [(16, 768), (768, 16)] * 200,   # kohya order: each module's down then up
    "full": [(4096, 4096)] * 3,
}
REFERENCE = "torch.AdamW"
BASELINES = (REFERENCE, "torch.AdamW.fused", "bnb.AdamW8bit")


parse_opt, format_opt = parse_spec, format_spec


def ablations(text: str) -> list[str]:
    """``text`` and one copy per technique switch of its class, flipped (see ``sd_hina_plugin.bench.ablation``)."""
    try:
        return switch_ablations(text)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


def build(name: str, kwargs: dict, named: list, lr: float):
    params = [p for _, p in named]
    if name == "torch.AdamW":
        return torch.optim.AdamW(params, lr=lr, foreach=True, **kwargs)
    if name == "torch.AdamW.fused":
        return torch.optim.AdamW(params, lr=lr, fused=True, **kwargs)
    if name == "bnb.AdamW8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, **kwargs)
    return sd_hina_plugin.create_optimizer(name, named, lr=lr, **kwargs)  # named: torch's param_names


def make_params(set_name, shapes, dtype, device, seed=0):
    """Parameters with gradients; the LoRA set also gets kohya names (down, up per module)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    named = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        if set_name == "lora":
            name = f"lora_unet_block_{i // 2}_to_q.{'lora_down' if i % 2 == 0 else 'lora_up'}.weight"
        else:
            name = f"layer_{i}.weight"
        named.append((name, p))
    return named


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def drop_modules(entries: list[dict], p: float, rng: random.Random) -> None:
    """Module dropout as kohya's LoRA does it: each module (a down/up pair) skips its forward with probability
    ``p``, so both factors have no gradient this step; the same modules for every optimizer of the round."""
    if not p:
        return
    n = len(entries[0]["grads"])
    dropped = [rng.random() < p for _ in range((n + 1) // 2)]
    for e in entries:
        for i, (param, grad) in enumerate(zip(e["params"], e["grads"])):
            param.grad = None if dropped[i // 2] else grad


def _compiles(label: str) -> bool:
    return label not in BASELINES and parse_opt(label)[1].get("compile") is True


def with_compiled(opts: list[str]) -> list[str]:
    """``opts`` and, after each optimizer of this package, the same with ``compile=True``."""
    out = []
    for text in opts:
        out.append(text)
        name, kwargs = parse_opt(text)
        if text not in BASELINES and "compile" not in kwargs:
            twin = format_opt(name, {**kwargs, "compile": True})
            if twin not in opts:
                out.append(twin)
    return out


def run_set(set_name: str, opts: list[str], reps: int, warmup: int, dtype, device, lr: float,
            module_dropout: float = 0.0) -> list[dict]:
    shapes = SETS[set_name]
    entries = []
    for text in [REFERENCE] + [o for o in opts if o != REFERENCE]:
        name, kwargs = parse_opt(text)
        named = make_params(set_name, shapes, dtype, device)
        opt = build(name, kwargs, named, lr)
        params = [p for _, p in named]
        entries.append({"label": text, "opt": opt, "times": [], "params": params, "grads": [p.grad for p in params]})
    numel = sum(torch.Size(s).numel() for s in shapes)
    rng = random.Random(0)
    compiling = any(_compiles(e["label"]) for e in entries)
    for e in entries:
        e["warmup_s"] = 0.0
    for _ in range(max(warmup, 5) if compiling else warmup):
        drop_modules(entries, module_dropout, rng)
        for e in entries:
            start = time.perf_counter()
            e["opt"].step()
            sync(device)
            e["warmup_s"] += time.perf_counter() - start
    drop_modules(entries, module_dropout, rng)
    for e in entries:  # counted after warm-up: state exists, caches are built
        if _compiles(e["label"]):  # the op counter would see the eager step: the profiler counts the compiled one
            counts = profiled_counts(e["opt"])
            e["ops"], e["syncs"], e["uploads"] = None, counts["syncs"], counts["uploads"]
        else:
            counter = count_step(e["opt"])
            e["ops"], e["syncs"], e["uploads"] = counter.total, counter.syncs, counter.uploads
    for rep in range(reps):
        order = entries[rep % len(entries):] + entries[:rep % len(entries)]
        drop_modules(entries, module_dropout, rng)
        for e in order:
            sync(device)
            start = time.perf_counter()
            e["opt"].step()
            sync(device)
            e["times"].append(time.perf_counter() - start)
    ref_times = entries[0]["times"]
    rows = []
    for e in entries:
        ms = statistics.median(e["times"]) * 1e3
        # the ratio of each round (the reference timed in the same round), then their median and quartiles:
        # robust to the machine's state changing during the run
        ratios = sorted(t / r for t, r in zip(e["times"], ref_times))
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        rows.append({
            "set": set_name, "optimizer": e["label"], "median_ms": round(ms, 2),
            "x_adamw_foreach": round(statistics.median(ratios), 2), "x_quartiles": [round(q1, 2), round(q3, 2)],
            "ops_per_step": e["ops"], "syncs_per_step": e["syncs"], "uploads_per_step": e["uploads"],
            "warmup_s": round(e["warmup_s"], 2),
            "state_bytes_per_param": round(state_bytes(e["opt"]) / numel, 3), "tensors": len(shapes), "params": numel,
        })
        e["opt"].zero_grad()
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| set | optimizer | median ms/step | x AdamW foreach | x quartiles | ops/step | syncs/step | uploads/step "
            "| state B/param | warmup s |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        q1, q3 = r["x_quartiles"]
        ops = "-" if r["ops_per_step"] is None else r["ops_per_step"]
        lines.append(f"| {r['set']} | {r['optimizer']} | {r['median_ms']:.2f} | {r['x_adamw_foreach']:.2f} | {q1:.2f}-{q3:.2f} | "
                     f"{ops} | {r['syncs_per_step']} | {r['uploads_per_step']} | {r['state_bytes_per_param']:.3f} | "
                     f"{r['warmup_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", choices=sorted(SETS), help="parameter set(s); default: lora and full")
    parser.add_argument("--opt", action="append", help="optimizer NAME[:k=v,...]; default: baselines + every registered optimizer")
    parser.add_argument("--ablate", action="append", default=[],
                        help="optimizer NAME[:k=v,...], timed with one copy per technique switch flipped (see above)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per optimizer (default 30 lora, 7 full)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--compile", action="store_true",
                        help="add a compile=True row after each optimizer of this package (see above)")
    parser.add_argument("--module-dropout", type=float, default=0.0,
                        help="LoRA set: each module (down/up pair) has no gradient in a step with this probability, "
                             "as under kohya's module_dropout (the same modules for every optimizer of a round)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    opts = list(args.opt or [])
    for text in args.ablate:
        opts += [o for o in ablations(text) if o not in opts]
    if not opts:
        opts = ["torch.AdamW.fused", "bnb.AdamW8bit"] + [s["name"] for s in sd_hina_plugin.list_optimizers()]
    if args.compile:
        opts = with_compiled(opts)
    rows = []
    for set_name in args.set or ["lora", "full"]:
        reps = args.reps or (30 if set_name == "lora" else 7)
        rows += run_set(set_name, opts, reps, args.warmup, dtype, device, args.lr, args.module_dropout)
    dropout = f", module dropout {args.module_dropout}" if args.module_dropout else ""
    print(f"torch {torch.__version__}, device {device}, {args.dtype}, threads {torch.get_num_threads()}{dropout}")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
