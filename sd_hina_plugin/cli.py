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
    for field in spec.config.field_specs():
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
