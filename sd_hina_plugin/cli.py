"""``sd-hina``: list the optimizers, show their arguments, validate kohya config files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from . import registry
from .config import kohya_literal, load_preset


def check_config_file(path: str | Path) -> tuple[str, list[str]]:
    """Validate a preset or a user's kohya ``--config_file``: the optimizer type resolves and every
    ``optimizer_args`` entry parses the way kohya parses it and is a valid argument. Returns (summary, errors)."""
    try:
        preset = load_preset(path)
        spec = registry.resolve(preset["optimizer_type"])
    except (ValueError, TypeError, OSError) as exc:
        return "", [str(exc)]
    errors = []
    if not preset["optimizer_type"].startswith("sd_hina_plugin."):
        errors.append(f"optimizer_type {preset['optimizer_type']!r}: unmodified kohya needs the dotted form "
                      f"'sd_hina_plugin.{spec.name}' (short names work only with the sd-hina-train launcher)")
    kwargs = {}
    for item in preset["optimizer_args"]:
        try:
            key, value = kohya_literal(item, spec.name)
            kwargs[key] = value
        except ValueError as exc:
            errors.append(str(exc))
    try:
        config = spec.config.from_kwargs(kwargs)
    except (ValueError, TypeError) as exc:
        errors.append(str(exc))
        config = None
    summary = f"{spec.name}: " + (", ".join(config.to_strings(only_changed=True)) or "defaults") if config else spec.name
    if "learning_rate" in preset:
        summary += f"; learning_rate={preset['learning_rate']}"
    return summary, errors


def _cmd_list(_: argparse.Namespace) -> int:
    rows = registry.list_optimizers()
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        aliases = f" (aliases: {', '.join(row['aliases'])})" if row["aliases"] else ""
        print(f"{row['name']:<{width}}  {row['summary']}{aliases}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    try:
        spec = registry.resolve(args.name)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{spec.name}: {spec.summary}")
    if spec.aliases:
        print(f"aliases: {', '.join(spec.aliases)}")
    print(f"kohya: --optimizer_type sd_hina_plugin.{spec.name} --optimizer_args \"key=value\" ...\n")
    from .engine.base import common_first

    for field in common_first(spec.config.field_specs()):
        print(f"  {field.name} ({field.kind}) = {field.to_text(field.default)}")
        print(f"      allowed: {field.range_text()}")
        print(f"      {field.help}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        summary, errors = check_config_file(path)
        if errors:
            status = 1
            print(f"{path}: INVALID")
            for err in errors:
                print(f"  - {err}")
        else:
            print(f"{path}: OK ({summary})")
    return status


def _cmd_bench(args: argparse.Namespace) -> int:
    import time

    import torch

    from .bench import TASKS, bench

    torch.set_num_threads(args.threads)
    if args.quick:
        steps, seeds, multipliers = args.steps or 60, args.seeds or 1, [1.0]
    else:
        steps, seeds = args.steps or 300, args.seeds or 3
        multipliers = [float(m) for m in args.lr_multipliers.split(",")]
    if args.ablate:
        from .bench.ablation import ablations

        optimizers = list(args.optimizer or [])
        for text in args.ablate:
            try:
                optimizers += [o for o in ablations(text, phases=True) if o not in optimizers]
            except ValueError as exc:
                print(exc, file=sys.stderr)
                return 2
    else:
        optimizers = args.optimizer or [s["name"] for s in registry.list_optimizers()] + ["bnb.AdamW8bit", "Prodigy"]
    tasks = args.task or list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        print(f"unknown task(s) {unknown}; available: {', '.join(TASKS)}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("bench_results") / time.strftime("%Y%m%d-%H%M%S")
    bench(tasks, optimizers, steps, seeds, multipliers, out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-hina", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered optimizers, aliases and one-line descriptions").set_defaults(func=_cmd_list)
    show = sub.add_parser("show", help="every argument of an optimizer: type, default, allowed range, help")
    show.add_argument("name")
    show.set_defaults(func=_cmd_show)
    validate = sub.add_parser("validate", help="check presets or kohya --config_file TOML files")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(func=_cmd_validate)
    bench = sub.add_parser("bench", help="LoRA/LoKr fine-tuning and classic benchmark tasks on the CPU: table, plots, TensorBoard")
    bench.add_argument("--task", action="append", help="task name (repeatable); default: all")
    bench.add_argument("--optimizer", action="append", help="NAME[:k=v,...] (repeatable); torch.AdamW is always included")
    bench.add_argument("--steps", type=int, help="optimizer steps per run (default 300; --quick 60)")
    bench.add_argument("--seeds", type=int, help="seeds per configuration (default 3; --quick 1)")
    bench.add_argument("--ablate", action="append", help="NAME[:k=v,...]: that configuration and one copy per technique or phase "
                       "switched (each use_* flipped, warmup_steps=0, a fixed lr mask, weight_decay=0); repeatable")
    bench.add_argument("--lr-multipliers", default="0.3333,1,3,9", help="lr sweep around each task's base lr (default: 1/3x to 9x)")
    bench.add_argument("--quick", action="store_true", help="60 steps, 1 seed, no sweep: under 3 minutes on 2 cores")
    bench.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: fastest for small kernels on 2 cores)")
    bench.add_argument("--out", help="results directory (default bench_results/<time>)")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `sd-hina show X | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
