"""``sd-hina``: list the optimizers, show their arguments, validate kohya config files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from . import registry
from .config import _suggest, kohya_literal, read_kohya_toml


def kohya_optimizer_type(value: object) -> tuple[registry.OptimizerSpec | None, str | None]:
    """(the optimizer, an error or None) for an ``optimizer_type`` as unmodified kohya resolves it: a dotted
    ``module.Name`` is imported and ``Name`` looked up with ``getattr``, case-sensitively. The spec is also
    returned with an error where the name is ours in another spelling, so its arguments can still be checked."""
    if not isinstance(value, str) or not value.strip():
        return None, f"optimizer_type = {value!r}: expected the name of an optimizer, e.g. 'sd_hina_plugin.HinaAdamWOptimizer'"
    if "." not in value:
        try:
            spec = registry.resolve(value)
        except ValueError as exc:
            return None, f"optimizer_type: {exc}"
        return spec, (f"optimizer_type {value!r}: unmodified kohya needs the dotted form 'sd_hina_plugin.{spec.name}' "
                      f"(short names work only with the sd-hina-train launcher)")
    module, _, name = value.rpartition(".")
    try:
        guess = registry.resolve(name)  # any case, aliases: what the user most likely meant
    except ValueError:
        guess = None
    if module.split(".")[0] != "sd_hina_plugin":
        hint = f"; this package's is 'sd_hina_plugin.{guess.name}'" if guess and module.lower().startswith("sd_hina") else ""
        return None, f"optimizer_type {value!r} is not an sd_hina_plugin optimizer{hint}"
    import importlib

    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        found = None
    spec = next((s for s in registry.specs() if s.cls is found), None)
    if spec is not None:
        return spec, None
    if guess is not None:
        hint = f" (did you mean 'sd_hina_plugin.{guess.name}'?)"
    else:
        names = {n for s in registry.specs() for n in (s.name, *s.aliases)}
        hint = _suggest(name, names).replace("'", "'sd_hina_plugin.", 1)
    return guess, (f"optimizer_type {value!r}: kohya imports {module!r} and looks up {name!r} with getattr, "
                   f"case-sensitively, and finds no optimizer of that name{hint}")


def check_config_file(path: str | Path, sd_scripts: str | Path | None = None) -> tuple[str, list[str]]:
    """Validate a preset or a user's kohya ``--config_file`` the way kohya reads it: every key is one kohya knows
    (keys from an sd-scripts checkout, else the shipped list), ``optimizer_type`` resolves exactly as kohya
    resolves it, ``learning_rate`` is a positive number, and every ``optimizer_args`` entry parses as kohya
    parses it and is a valid argument. Returns (summary, every error found)."""
    from .kohya.config_keys import known_keys

    try:
        flat = read_kohya_toml(path)
    except (ValueError, OSError) as exc:
        return "", [str(exc)]
    errors: list[str] = []

    spec = None
    if "optimizer_type" not in flat:
        errors.append("no 'optimizer_type' key")
    else:
        spec, problem = kohya_optimizer_type(flat["optimizer_type"])
        if problem:
            errors.append(problem)
    owner = spec.name if spec else "optimizer_args"

    lr = flat.get("learning_rate")
    if "learning_rate" in flat:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            errors.append(f"learning_rate = {lr!r}: expected a number")
            lr = None
        elif not lr > 0:
            errors.append(f"learning_rate = {lr!r}: must be greater than 0 (kohya passes it as the optimizer's lr)")
            lr = None

    items = flat.get("optimizer_args", [])
    if isinstance(items, str) or not isinstance(items, list):
        errors.append("'optimizer_args' must be an array of strings such as [\"weight_decay=0.01\"] "
                      "(kohya iterates a plain string character by character)")
        items = []
    kwargs: dict = {}
    for item in items:
        try:
            key, value = kohya_literal(item, owner)
        except (ValueError, TypeError) as exc:
            errors.append(str(exc))
            continue
        if key in kwargs:
            errors.append(f"{owner}: argument {key!r} given twice in optimizer_args (kohya keeps the last)")
        if key == "lr":
            errors.append(f"{owner}: 'lr' in optimizer_args: kohya also passes learning_rate as lr, so the optimizer "
                          f"would get lr twice; set learning_rate instead")
            continue
        kwargs[key] = value
    config = None
    if spec is not None:
        arg_errors = []
        for key, value in kwargs.items():
            try:
                spec.config.from_kwargs({key: value})
            except (ValueError, TypeError) as exc:
                arg_errors.append(str(exc))
        if lr is not None:
            try:
                spec.config.from_kwargs({"lr": lr})
            except (ValueError, TypeError) as exc:
                arg_errors.append(f"learning_rate: {exc}")
        errors += arg_errors
        if not arg_errors:
            config = spec.config.from_kwargs(kwargs)

    keys, source = known_keys(sd_scripts)
    for key in flat:
        if key not in keys:
            errors.append(f"unknown key {key!r}{_suggest(key, keys)}: kohya does not read it and would silently use "
                          f"its default instead (keys read from {source})")

    summary = spec.name if spec else ""
    if config is not None:
        summary += ": " + (", ".join(config.to_strings(only_changed=True)) or "defaults")
    if "learning_rate" in flat:
        summary += f"; learning_rate={flat['learning_rate']}"
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
    from .config import common_first

    for field in common_first(spec.config.field_specs()):
        print(f"  {field.name} ({field.kind}) = {field.to_text(field.default)}")
        print(f"      allowed: {field.range_text()}")
        print(f"      {field.help}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        summary, errors = check_config_file(path, args.sd_scripts)
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
    validate = sub.add_parser("validate", help="check presets or kohya --config_file TOML files as kohya reads them")
    validate.add_argument("files", nargs="+")
    validate.add_argument("--sd-scripts", help="sd-scripts checkout whose parsers give the keys kohya knows (default: "
                          "$SD_SCRIPTS_DIR, else ../shared/sd-scripts, else the list shipped with this package)")
    validate.set_defaults(func=_cmd_validate)
    bench = sub.add_parser("bench", help="LoRA/LoKr fine-tuning and classic benchmark tasks on the CPU: table, plots, TensorBoard")
    bench.add_argument("--task", action="append", help="task name (repeatable); default: all")
    bench.add_argument("--optimizer", action="append", help="NAME[:k=v,...] (repeatable); torch.AdamW is always included")
    bench.add_argument("--steps", type=int, help="optimizer steps per run (default 300; --quick 60)")
    bench.add_argument("--seeds", type=int, help="seeds per configuration (default 3; --quick 1)")
    bench.add_argument("--ablate", action="append", help="NAME[:k=v,...]: that configuration and one copy per technique or phase "
                       "switched (each use_* flipped, warmup_steps=0, a fixed lr mask, weight_decay=0); repeatable")
    bench.add_argument("--lr-multipliers", default="0.3333,1,3,9", help="lr sweep around each task's base lr (default: 1/3x to 9x)")
    bench.add_argument("--quick", action="store_true",
                       help="60 steps, 1 seed, no sweep: 3-4 minutes on 2 cores (encoder-lora pretrains its model first)")
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
