"""Build a named optimizer's config class from its techniques' fields."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

from ..config import ConfigBase, Field, make_config
from ..engine.technique import Technique

COMPILE = Field(
    "compile", "bool", False,
    "Compile each pack's step with torch.compile (the first steps of each phase pay the compile time; falls back to "
    "eager, with a log line, where no compiler works). Measured on CPU: faster for HinaAdamWCore and "
    "HinaAdamWOptimizer, about equal for Automagic_Sinkgd, slower for AdamW_HinaAdaptive and the CameAMP names "
    "(docs/benchmarks.md); not measured on GPU.")


def config_for(name: str, techniques: Iterable[Technique], extra: Iterable[Field] = (),
               defaults: Mapping[str, Any] | None = None) -> type[ConfigBase]:
    """Fields of every technique (switched on or not: a switch is an argument too), plus ``extra``,
    with this optimizer's own ``defaults``."""
    fields: dict[str, Field] = {}
    for spec in [f for t in techniques for f in t.all_fields()] + list(extra) + [COMPILE]:
        fields.setdefault(spec.name, spec)
    for key, value in (defaults or {}).items():
        if key not in fields:
            raise ValueError(f"{name}: default given for unknown field {key!r}")
        fields[key] = dataclasses.replace(fields[key], default=value)
    return make_config(name, fields.values())


class NotesOnGivenSwitches:
    """Mixin for optimizers: a technique with ``note_when_given`` (Cautious yielding to Grams) explains itself
    only to users who set its switch, as a keyword argument or in a param group. A combination the defaults make
    on their own is documented (docs/optimizers.md), not logged to everyone who kept the defaults."""

    def adamw_keywords(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        # called with the constructor's keywords and with each param group's own keys: what the user gave
        self.__dict__.setdefault("_given_arguments", set()).update(kwargs)
        return super().adamw_keywords(kwargs)  # type: ignore[misc]

    def notes(self) -> list[str]:
        out = super().notes()  # type: ignore[misc]
        given = self.__dict__.get("_given_arguments", set())
        unasked = {tech.note(group) for tech in self.TECHNIQUES  # type: ignore[attr-defined]
                   if getattr(tech, "note_when_given", False) and tech.switch.name not in given
                   for group in self.param_groups}  # type: ignore[attr-defined]
        return [note for note in out if note not in unasked]
