"""Time classification and pairing of adapter parameter names (a benchmark, not a test).

    python scripts/bench_lora_names.py --modules 2500

builds kohya LoRA (down/up), LyCORIS LoKr (w1, w2_a, w2_b), PEFT LoRA (lora_A/B.default) and Flux
split-qkv names for the given number of modules per scheme, then times ``sd_hina_plugin.lora.pair``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd_hina_plugin.lora import pair  # noqa: E402


def names(modules: int) -> list[str]:
    out = []
    for i in range(modules):
        block = f"down_blocks_{i % 4}_attentions_{i % 3}_transformer_blocks_{i}_attn1_to_q"
        out += [f"lora_unet_{block}.lora_down.weight", f"lora_unet_{block}.lora_up.weight"]
        out += [f"lora_unet_{block}_lokr.lokr_w1", f"lora_unet_{block}_lokr.lokr_w2_a", f"lora_unet_{block}_lokr.lokr_w2_b"]
        out += [f"base_model.model.layers.{i}.self_attn.q_proj.lora_A.default.weight",
                f"base_model.model.layers.{i}.self_attn.q_proj.lora_B.default.weight"]
        out += [f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_down.{k}.weight" for k in range(3)]
        out += [f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_up.{k}.weight" for k in range(3)]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--modules", type=int, default=800, help="modules per naming scheme (13 names each)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    items = names(args.modules)
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        result = pair(items)
        times.append(time.perf_counter() - start)
    complete = sum(m.complete for m in result.modules.values())
    print(f"{len(items)} names, {complete} complete modules, {len(result.unpaired)} unpaired: "
          f"median {statistics.median(times) * 1e3:.1f} ms ({statistics.median(times) / len(items) * 1e6:.2f} us/name)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
