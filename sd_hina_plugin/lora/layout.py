"""The optimizer's view of its adapter: role of every parameter, complete modules, where pairs are split.

Built from names (``lora/names.py``) when they are known. Without names, shape rules stand in: a matrix
(or conv kernel) with few rows and many columns is an A/down factor, one with many rows and few columns a
B/up factor, and consecutive A, B of matching rank in a group are paired. That is what kohya's parameter
order gives without LoRA+; it is reported as ``source = "shape rules"`` and is the last resort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .names import AdapterModule, Pairing, Role, pair

#: the factor that starts at zero in each family (kohya / LyCORIS / PEFT initialisation): the one that
#: LoRA+ (Hayou et al., arXiv 2402.12354) gives the larger learning rate
ZERO_INIT_ROLES = (Role.LORA_B, Role.LOKR_W2, Role.LOKR_W2_B, Role.HADA_W2_A)
RANK_LIMIT = 256


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if not shape:
        return (1, 1)
    return (shape[0], math.prod(shape[1:]))


def shape_role(shape: tuple[int, ...]) -> Role:
    """The role a tensor of ``shape`` (the whole tensor's, for a shard) plays by the shape rules."""
    if len(shape) < 2:
        return Role.REGULAR
    rows, cols = _matrix_shape(shape)
    if rows < cols and rows <= RANK_LIMIT:
        return Role.LORA_A
    if cols < rows and cols <= RANK_LIMIT:
        return Role.LORA_B
    return Role.REGULAR


@dataclass
class LoraLayout:
    source: str
    pairing: Pairing
    name_of: dict[int, str]
    group_of: dict[int, int]
    params: dict[str, torch.nn.Parameter]
    split_modules: list[str] = field(default_factory=list)
    #: structures techniques derive from the layout once (e.g. pairs grouped by shape); rebuilt with it
    cache: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, trainable: list[tuple[int, torch.Tensor]], names: dict[int, str], source: str,
              shape_of: Callable[[torch.Tensor], tuple[int, ...]] = lambda p: tuple(p.shape)) -> "LoraLayout":
        """The layout of the ``trainable`` tensors, given as (param group index, tensor), named by ``names`` (by id);
        ``shape_of`` gives the whole tensor's shape (a shard's is its rows', which the shape rules must not see:
        ranks holding different rows would pair differently)."""
        name_of: dict[int, str] = {}
        if source == "none" or not names:
            source = "shape rules"
            pending: dict[int, tuple[str, torch.Tensor]] = {}
            for gi, p in trainable:
                role = shape_role(shape_of(p))
                index = len(name_of)
                if role is Role.LORA_A:
                    pending[gi] = (f"param{index}", p)
                    name_of[id(p)] = f"param{index}"  # provisional; renamed when its B follows
                elif role is Role.LORA_B and gi in pending and _matrix_shape(shape_of(pending[gi][1]))[0] == _matrix_shape(shape_of(p))[1]:
                    base, a = pending.pop(gi)
                    name_of[id(a)] = f"{base}.lora_down.weight"
                    name_of[id(p)] = f"{base}.lora_up.weight"
                else:
                    name_of[id(p)] = f"param{index}"
        else:
            for gi, p in trainable:
                name_of[id(p)] = names.get(id(p), f"unnamed{len(name_of)}")
        group_of = {id(p): gi for gi, p in trainable}
        params = {name_of[id(p)]: p for _, p in trainable}
        pairing = pair(params)
        split = sorted(m.key for m in pairing.modules.values()
                       if m.complete and len({group_of[id(params[n])] for n in m.members.values()}) > 1)
        return cls(source, pairing, name_of, group_of, params, split)

    def role(self, p: torch.Tensor) -> Role:
        name = self.name_of.get(id(p))
        return self.pairing.role(name) if name is not None else Role.REGULAR

    def module(self, p: torch.Tensor) -> AdapterModule | None:
        name = self.name_of.get(id(p))
        return self.pairing.module_of(name) if name is not None else None

    def members(self, module: AdapterModule) -> dict[Role, torch.nn.Parameter]:
        return {role: self.params[name] for role, name in module.members.items()}

    def complete(self, family: str) -> list[AdapterModule]:
        return [m for m in self.pairing.modules.values() if m.family == family and m.complete]

    @property
    def roles_split_by_groups(self) -> bool:
        """True when pairs straddle param groups, e.g. kohya's ``loraplus_lr_ratio`` (ups in "plus" groups)."""
        return bool(self.split_modules)

    def diagnose(self, groups_members: list[tuple[str, list[torch.Tensor]]]) -> dict[str, Any]:
        """Per group ((name, its trainable tensors), in ``param_groups`` order): role counts; then pairs and names."""
        groups = []
        for gi, (name, members) in enumerate(groups_members):
            counts: dict[str, int] = {}
            for p in members:
                counts[self.role(p).value] = counts.get(self.role(p).value, 0) + 1
            groups.append({"group": gi, "name": name, "roles": counts})
        modules = self.pairing.modules.values()
        return {
            "names_source": self.source,
            "groups": groups,
            "modules": {fam: sum(1 for m in modules if m.family == fam and m.complete) for fam in ("lora", "lokr", "loha")},
            "pairs": [{"module": m.key, "family": m.family, "members": {r.value: n for r, n in m.members.items()},
                       "extras": {r.value: n for r, n in m.extras.items()}}
                      for m in modules if m.complete],
            "unpaired": [{"name": n, "role": self.pairing.role(n).value, "shape": tuple(self.params[n].shape),
                          "module": self.pairing.infos[n].module, "missing": self.pairing.module_of(n).missing}
                         for n in self.pairing.unpaired],
            "duplicates": self.pairing.duplicates,
            "split_across_groups": self.split_modules,
            "parameters": [{"name": n, "role": self.pairing.role(n).value, "shape": tuple(p.shape),
                            "group": self.group_of[id(p)], "module": self.pairing.infos[n].module}
                           for n, p in self.params.items()],
        }
