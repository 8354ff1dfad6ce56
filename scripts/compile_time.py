"""Compile time of ``compile=True`` on first use: the first steps of an optimizer with ``compile=True`` minus the
same steps eagerly, with an empty inductor cache (a fresh ``TORCHINDUCTOR_CACHE_DIR`` per optimizer, each in a
process of its own, so nothing compiled for one is reused by the next). LoRA set of ``scripts/bench_step.py``,
one thread:

    python scripts/compile_time.py HinaAdamWCore HinaAdamWOptimizer:optim_bits=32 Automagic_CameAMP
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(spec: str, steps: int) -> None:
    """Run in a child process with a fresh inductor cache (set before torch is imported)."""
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    sys.path.insert(0, str(ROOT))
    from bench_step import SETS, build, make_params, parse_opt

    torch.set_num_threads(1)
    name, kwargs = parse_opt(spec)
    seconds = {}
    for compile in (False, True):
        named = make_params("lora", SETS["lora"], torch.float32, torch.device("cpu"))
        opt = build(name, {**kwargs, "compile": compile}, named, 1e-4)
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        seconds[compile] = time.perf_counter() - start
    info = opt.get_optimization_info()["compile"]
    print(f"| `{spec}` | {info['packs']} | {info['graphs']} | {seconds[False]:.1f} | {seconds[True]:.1f} | "
          f"{seconds[True] - seconds[False]:.0f} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("opts", nargs="+", help="NAME[:key=value,...] as in scripts/bench_step.py")
    parser.add_argument("--steps", type=int, default=6, help="steps timed (the first is eager either way)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        measure(args.opts[0], args.steps)
        return 0
    print("| optimizer | packs | graphs | eager s | compiled s | compile time, s |\n|---|---:|---:|---:|---:|---:|")
    for spec in args.opts:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps), spec], env=env, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
