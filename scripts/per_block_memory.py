"""Peak memory of a full fine-tune step of SDXL-shaped blocks: one optimizer over all parameters against one optimizer
per block stepped from backward hooks (kohya's ``--fused_optimizer_groups`` / ``--blockwise_fused_optimizers``),
with torch AdamW and bitsandbytes AdamW8bit beside them. The figures of docs/kohya.md ("Per-block optimizers").

    python scripts/per_block_memory.py                 # every row, each in a fresh process
    python scripts/per_block_memory.py --device-cap    # packs as large as on CUDA (32 M elements), not CPU's 1 M

The model: ``--blocks`` transformer blocks of SDXL's widest stage (1280 features: q, k, v, out 1280x1280; feed-forward
1280x10240 (GEGLU) and 5120x1280; 22.9 M parameters a block), fp32, a batch of 2 x 64 tokens. Each row runs in its own
process: peak resident memory (``ru_maxrss``) over two steps, minus the resident memory after the model was built;
and, for our optimizers, optimizer state and scratch as the optimizer counts them. One intra-op thread.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

ROWS = [("torch.AdamW", "one"), ("torch.AdamW", "per-block"), ("bnb.AdamW8bit", "one"), ("bnb.AdamW8bit", "per-block"),
        ("HinaAdamWCore", "one"), ("HinaAdamWCore", "per-block"), ("HinaAdamWCore", "per-block, own pools"),
        ("Automagic_CameAMP", "one"), ("Automagic_CameAMP", "per-block"), ("Automagic_CameAMP", "per-block, own pools"),
        ("Automagic_Sinkgd", "one"), ("Automagic_Sinkgd", "per-block")]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(name: str, mode: str, blocks: int, device_cap: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if device_cap:
        import sd_hina_plugin.engine.pack as pack

        pack.CPU_CHUNK = pack.CHUNK
    if mode.endswith("own pools"):  # what the optimizers did before they shared one pool
        from sd_hina_plugin.engine.pack import ScratchPool

        ScratchPool.shared = classmethod(lambda cls: cls())

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(1280, 1280) for _ in range(4))
            self.ff1, self.ff2 = torch.nn.Linear(1280, 10240), torch.nn.Linear(5120, 1280)

        def forward(self, x):
            a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 1280 ** 0.5, -1) @ self.v(x)
            x = x + self.o(a)
            h, gate = self.ff1(x).chunk(2, -1)
            return x + self.ff2(h * torch.nn.functional.gelu(gate))

    model = torch.nn.Sequential(*[Block() for _ in range(blocks)])
    base = rss_mib()

    def make(params):
        if name == "torch.AdamW":
            return torch.optim.AdamW(params, lr=1e-5)
        if name == "bnb.AdamW8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=1e-5)
        import sd_hina_plugin

        return sd_hina_plugin.create_optimizer(name, params, lr=1e-5)

    if mode == "one":
        optimizers = [make(list(model.parameters()))]
    else:
        optimizers = []
        for block in model:
            params = list(block.parameters())
            opt = make(params)
            optimizers.append(opt)
            left = {"n": len(params)}

            def hook(_, opt=opt, left=left, total=len(params)):
                left["n"] -= 1
                if not left["n"]:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    left["n"] = total

            for p in params:
                p.register_post_accumulate_grad_hook(hook)
    for step in range(2):
        x = torch.randn(2, 64, 1280, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        if mode == "one":
            optimizers[0].step()
            optimizers[0].zero_grad(set_to_none=True)
    out = {"peak_mib": rss_mib() - base, "params": sum(p.numel() for p in model.parameters())}
    if hasattr(optimizers[0], "state_bytes"):
        out["state_mib"] = sum(o.state_bytes() for o in optimizers) / 2 ** 20
        pools = {id(o._pool): o._pool.nbytes() for o in optimizers}
        out["scratch_mib"] = sum(pools.values()) / 2 ** 20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--device-cap", action="store_true", help="packs of up to 32 M elements, as on CUDA")
    parser.add_argument("--worker", nargs=2, metavar=("NAME", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.blocks, args.device_cap)))
        return
    print(f"| optimizer | optimizers | peak MiB over the model | state MiB | scratch MiB |  ({args.blocks} blocks, "
          f"{'device' if args.device_cap else 'CPU'} pack cap)")
    print("|---|---|---:|---:|---:|")
    for name, mode in ROWS:
        cmd = [sys.executable, __file__, "--worker", name, mode, "--blocks", str(args.blocks)]
        cmd += ["--device-cap"] if args.device_cap else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"| {name} | {mode} | failed: {done.stderr.strip().splitlines()[-1]} | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        state = f"{r['state_mib']:.0f}" if "state_mib" in r else "—"
        scratch = f"{r['scratch_mib']:.0f}" if "scratch_mib" in r else "—"
        print(f"| {name} | {mode} | {r['peak_mib']:.0f} | {state} | {scratch} |", flush=True)


if __name__ == "__main__":
    main()
