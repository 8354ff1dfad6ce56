"""Ablations: one optimizer configuration and copies of it with one technique or phase switched.

Used by ``sd-hina bench --ablate`` (what each switch does to the held-out loss) and by
``scripts/bench_step.py --ablate`` (what it costs per step).
"""

from __future__ import annotations

from typing import Any

from .. import registry
from ..config import _parse_text

BASELINES = ("torch.AdamW", "torch.AdamW.fused", "bnb.AdamW8bit", "Prodigy")


def split_items(rest: str) -> list[str]:
    """``k=v,k2=(a, b)`` -> the items, splitting on commas outside parentheses and brackets (tuple values)."""
    items, depth, current = [], 0, ""
    for char in rest:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [item for item in items + [current] if item.strip()]


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:k=v,...]`` -> (name, keyword arguments), values read as kohya reads them (tuples in parentheses)."""
    name, _, rest = text.partition(":")
    kwargs = {}
    for item in split_items(rest) if rest else []:
        key, _, value = item.partition("=")
        kwargs[key.strip()] = _parse_text(value)
    return name.strip(), kwargs


def format_spec(name: str, kwargs: dict[str, Any]) -> str:
    return name + (":" + ",".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else "")


def ablations(text: str, phases: bool = False) -> list[str]:
    """``text``, then for each distinct technique switch of the optimizer's class, ``text`` with that switch
    flipped from its value there (on -> off: what the technique does or costs; off -> on: what enabling it does).

    With ``phases``, also the switches that are not techniques of their own (``use_*`` arguments read inside a
    technique, such as CameAMP's ``use_tam``), and: no warm-up phase (``warmup_steps=0``), a fixed lr mask
    (``lr_bump=0``: multiplier 1, for classes whose mask has no switch), no weight decay (``weight_decay=0``)."""
    name, kwargs = parse_spec(text)
    if name in BASELINES:
        raise ValueError(f"--ablate: {name} is a baseline without technique switches; give a sd_hina_plugin optimizer")
    spec = registry.resolve(name)
    values = spec.config.from_kwargs(kwargs).as_dict()
    fields = spec.config.FIELDS
    out, seen = [text], set()
    flips = [t.switch.name for t in spec.cls.TECHNIQUES if t.switch is not None]
    if phases:
        flips += [n for n, f in fields.items() if f.kind == "bool" and n.startswith("use_")]
    for switch in flips:
        if switch not in seen:
            seen.add(switch)
            out.append(format_spec(name, {**kwargs, switch: not values[switch]}))
    if phases:
        extra = []
        if values.get("warmup_steps"):
            extra.append({"warmup_steps": 0})
        if "lr_mask_bump" in fields and "use_lr_mask" not in fields:
            extra.append({"lr_bump": 0.0})
        if values.get("weight_decay"):
            extra.append({"weight_decay": 0.0})
        out += [format_spec(name, {**kwargs, **change}) for change in extra]
    return out
