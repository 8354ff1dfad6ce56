"""Names and LoRA roles of the tensors a HinaOptimizer trains (mixed into it).

Names come, in order, from ``param_names`` in the groups, ``param_name`` attributes, kohya's frames, a module scan
(``lora/discovery.py``) or names learnt earlier (``attach_names``); tensors an engine cut from its flat partitions
(``engine/distributed.py``) take the names of the parameters they stand for. From the names, ``lora/layout.py``
builds roles, modules and pairs; without names, shape rules stand in and the optimizer says so once.
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Any

import torch

from ..lora import discovery
from ..lora.layout import LoraLayout
from ..lora.names import classify
from . import sharding

logger = logging.getLogger("sd_hina_plugin")
_KOHYA_MODULE = "library.train_util"  # the module scan is a fallback for kohya only (it walks every live object)


class NameMemo:
    """Names learnt for tensors, by id, valid only while the tensor they were learnt for lives (an id can be taken by
    a new tensor once the old one is gone, and must not inherit its name)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, str]] = {}

    def learn(self, tensor: torch.Tensor, name: str) -> None:
        self._entries[id(tensor)] = (weakref.ref(tensor), name)

    def get(self, key: int) -> str | None:
        entry = self._entries.get(key)
        if entry is None or entry[0]() is None:
            return None
        return entry[1]

    def as_dict(self) -> dict[int, str]:
        return {key: name for key, (ref, name) in self._entries.items() if ref() is not None}

    def __bool__(self) -> bool:
        return bool(self.as_dict())


class Naming:
    def _own_tensors(self) -> list[torch.Tensor]:
        """The parameters trained as themselves or as their local shards (FSDP2), not views an engine cut from its
        flat partitions: what names are found for."""
        return [self._binding.source(m) for _, m in self._binding.all_members() if self._binding.fragment(m) is None]

    def _trainable_ids(self) -> set[int]:
        return {id(p) for p in self._own_tensors()}

    def _discover_names(self) -> None:
        own = self._own_tensors()
        names, source = discovery.names_from_groups(self._binding.groups), "param_names"
        wanted = {id(p) for p in own}
        if not wanted <= names.keys():
            tagged = discovery.names_from_attributes(own)
            if tagged:
                names, source = {**tagged, **names}, "param_name attributes"
        if not wanted <= names.keys():
            found = discovery.names_from_kohya_frame(own)
            source = "kohya frame"
            if not (wanted <= (names.keys() | found.keys())) and _KOHYA_MODULE in sys.modules:
                found = discovery.names_from_module_scan(own)
                source = "module scan"
            names = {**found, **names}
            learnt = self._names_seen.as_dict()
            if not wanted <= names.keys() and wanted <= (names.keys() | learnt.keys()):
                # names learnt earlier (attach_names, or before a tensor changed requires_grad) still hold
                names, source = {**learnt, **names}, getattr(self, "_lora", None) and self._lora.source or "names learnt earlier"
            if not wanted <= names.keys():
                source = "none"
        if not own and self._names_seen:  # every tensor cut from an engine's partitions: their parameters' names
            source = "names learnt before the engine partitioned the parameters"
        self._set_layout(names, source)

    def _module_of(self, p: torch.Tensor) -> str | None:
        """The adapter module of parameter ``p`` by the name learnt for it (None: no name, or no adapter role)."""
        name = self._names_seen.get(id(p))
        if name is None:
            return None
        info = classify(name)
        return info.module if info.role.family != "other" else None

    def _set_layout(self, names: dict[int, str], source: str) -> None:
        names = dict(names)
        # a group's parameters by place: accelerate swaps them for their sharded forms (FSDP2) in place, after the
        # optimizer learnt the names of the originals, which may be gone by then
        by_place = self.__dict__.setdefault("_names_by_place", {})
        for group in self._binding.groups:
            home = self._binding.home(group)
            for j, p in enumerate(group["params"]):
                name = names.get(id(p)) or self._names_seen.get(id(p))
                if name is not None:
                    by_place[(home, j)] = name
                elif (home, j) in by_place and sharding.is_dtensor(p):
                    names[id(p)] = by_place[(home, j)]
        for _, member in self._binding.all_members():
            origin = self._binding.source(member)
            if origin is member:
                continue
            seen = names.get(id(origin)) if self._binding.fragment(member) is None else None
            seen = seen or self._names_seen.get(id(origin))
            if seen is not None:
                names[id(member)] = seen
                self._names_seen.learn(origin, seen)
        self._lora = LoraLayout.build(self._binding.all_members(), names, source, self.full_shape)
        if self._lora.source != "shape rules":
            for name, p in self._lora.params.items():
                self._names_seen.learn(p, name)
        self._names_reported = False
        for pack in self._all_planned():
            pack.derived.clear()

    def _report_missing_names(self) -> None:
        """Say once, at the first step (so a later ``attach_names`` can still supply them), that roles come
        from shapes, if any enabled technique depends on roles."""
        if self._names_reported:
            return
        self._names_reported = True
        if self._lora.source == "shape rules" and any(t.uses_roles for g in self.param_groups for t in self.techniques(g)):
            roles = [self._lora.role(p).value for _, p in self._binding.all_members()]
            logger.warning(
                "%s: no parameter names, so LoRA/LoKr roles come from shape rules (%d A-like, %d B-like tensors). "
                "Pass model.named_parameters(), put 'param_names' in the param groups, or call "
                "optimizer.attach_names(model.named_parameters()).",
                self.NAME, roles.count("lora_a"), roles.count("lora_b"))

    @property
    def lora(self) -> LoraLayout:
        """Roles, adapter modules and pairs of the trainable parameters (see ``lora/layout.py``)."""
        return self._lora

    def attach_names(self, named_parameters: Any) -> Any:
        """Give the optimizer parameter names: an ``nn.Module`` or an iterable of ``(name, parameter)``."""
        if isinstance(named_parameters, torch.nn.Module):
            named_parameters = named_parameters.named_parameters()
        named_parameters = list(named_parameters)
        names = {id(p): n for n, p in named_parameters}
        # parameters an engine has since cut into partitions (DeepSpeed) pass their names on to the views of them
        sources = {id(f.source) for _, m in self._binding.all_members() if (f := self._binding.fragment(m)) is not None}
        for n, p in named_parameters:
            if id(p) in sources:
                self._names_seen.learn(p, n)
        wanted = self._trainable_ids() | sources
        covered = len(wanted & names.keys())
        if not covered:
            raise ValueError(f"{self.NAME}.attach_names: none of the given names belongs to a parameter of this optimizer")
        merged = {**discovery.names_from_groups(self._binding.groups), **names}
        self._set_layout(merged, "attach_names" if covered == len(wanted) else "attach_names (partial)")
        return self

