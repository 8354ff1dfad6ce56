"""Name -> optimizer class, with aliases, case-insensitive lookup and the kohya dotted form."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .config import ConfigBase


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    cls: type
    aliases: tuple[str, ...]
    summary: str

    @property
    def config(self) -> type[ConfigBase]:
        return self.cls.Config


_REGISTRY: dict[str, OptimizerSpec] = {}
_LOOKUP: dict[str, str] = {}


def register(aliases: Iterable[str] = (), summary: str = ""):
    """Class decorator: register a :class:`HinaOptimizer` subclass under its ``NAME`` and ``aliases``."""

    def wrap(cls: type) -> type:
        spec = OptimizerSpec(cls.NAME, cls, tuple(aliases), summary or (cls.__doc__ or "").strip().splitlines()[0])
        for key in (cls.NAME, *spec.aliases):
            if key.lower() in _LOOKUP and _LOOKUP[key.lower()] != cls.NAME:
                raise ValueError(f"optimizer name {key!r} is already registered for {_LOOKUP[key.lower()]}")
            _LOOKUP[key.lower()] = cls.NAME
        _REGISTRY[cls.NAME] = spec
        return cls

    return wrap


#: other libraries' optimizer names users type, and what to use here instead
_FOREIGN = {
    "adamw": "torch's AdamW; the same update here is HinaAdamWCore (optim_bits=32 by default)",
    "adamw8bit": "bitsandbytes' AdamW8bit; the same update here is HinaAdamWCore with optim_bits=8",
    "pagedadamw8bit": "bitsandbytes' PagedAdamW8bit; the nearest here is HinaAdamWCore with optim_bits=8 (not paged)",
    "adafactor": "transformers' Adafactor; the factored second moment here is Automagic_CameAMP (CAME)",
    "came": "CAME; here it is the core of Automagic_CameAMP",
    "prodigy": "prodigyopt's Prodigy, not part of this package",
}


def resolve(name: str) -> OptimizerSpec:
    """Find an optimizer by name or alias, any case, with or without the ``sd_hina_plugin.`` prefix."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}")
    key = name.strip()
    for prefix in ("sd_hina_plugin.",):
        if key.lower().startswith(prefix):
            key = key[len(prefix):]
    found = _LOOKUP.get(key.lower())
    if found is None and key.lower() in _FOREIGN:
        raise ValueError(f"unknown optimizer {name!r}: {_FOREIGN[key.lower()]}; registered: {', '.join(sorted(_REGISTRY))}")
    if found is None:
        choices = sorted({*(s.name for s in _REGISTRY.values()), *(a for s in _REGISTRY.values() for a in s.aliases)})
        close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown optimizer {name!r}{hint}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[found]


def specs() -> list[OptimizerSpec]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def list_optimizers() -> list[dict[str, Any]]:
    """Every registered optimizer: name, aliases and one-line summary."""
    return [{"name": s.name, "aliases": list(s.aliases), "summary": s.summary} for s in specs()]


def create_optimizer(name: str, params: Any, lr: float | None = None,
                     args: Mapping[str, Any] | Iterable[str] | str | None = None, **kwargs: Any):
    """Build a registered optimizer. ``args`` is a dict of typed values or a list of ``key=value`` strings,
    read exactly as kohya reads ``--optimizer_args`` (``ast.literal_eval``: ``use_grams=True``,
    ``low_precision_update='kahan'``). An argument given twice (``lr=`` and ``args=["lr=..."]``) is an error."""
    spec = resolve(name)
    if args is None:
        values: dict[str, Any] = {}
    elif isinstance(args, Mapping):
        values = dict(args)
    else:
        values = spec.config.parse_strings(args)
    spec.config.check_names(values)
    overlap = set(values) & (set(kwargs) | ({"lr"} if lr is not None else set()))
    if overlap:
        raise ValueError(f"{spec.name}: {sorted(overlap)} given both in args and as keyword arguments; give each once")
    values.update(kwargs)
    if lr is not None:
        values["lr"] = lr
    return spec.cls(params, **values)
