"""Parameter roles from names, and pairing of the members of each adapter module.

Recognised naming schemes (see the kohya contract §3 and the LyCORIS / PEFT dumps):

* kohya ``networks/lora*.py``: ``<lora_name>.lora_down.weight`` / ``.lora_up.weight``; Flux split qkv
  ``lora_down.0.weight`` ... ``lora_up.3.weight`` (each index its own pair); LoCon conv kernels alike.
* LyCORIS 4.x (``lycoris_<path>`` and kohya prefixes): ``lora_down/lora_mid/lora_up.weight``,
  ``lokr_w1``, ``lokr_w1_a``, ``lokr_w1_b``, ``lokr_w2``, ``lokr_w2_a``, ``lokr_w2_b``, ``lokr_t1``,
  ``lokr_t2``, ``hada_w1_a`` ... ``hada_w2_b``, ``hada_t1``, ``hada_t2``, ``dora_scale``, ``scalar``,
  ``w_norm``/``b_norm``.
* PEFT: ``lora_A.<adapter>.weight``, ``lora_B.<adapter>.weight``, ``lora_embedding_A/B.<adapter>``,
  ``lora_magnitude_vector.<adapter>.weight``, ``lokr_w1.<adapter>``, ``hada_w1_a.<adapter>`` (ParameterDicts,
  no ``.weight``); the adapter name is part of the module key, so two adapters never pair with each other.
* diffusers: ``<module>.lora.down.weight`` / ``.lora.up.weight``, ``lora_linear_layer.down/up.weight``,
  ``to_q_lora.down.weight``.

The module key is the name up to the role token, so pairing is by module prefix and never by position:
it works when kohya's LoRA+ puts the halves of a pair into different param groups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable


class Role(str, Enum):
    LORA_A = "lora_a"          # down / A: (r, in[, k, k])
    LORA_B = "lora_b"          # up / B: (out, r[, 1, 1])
    LORA_MID = "lora_mid"      # Tucker core of a conv LoRA
    LOKR_W1 = "lokr_w1"
    LOKR_W1_A = "lokr_w1_a"
    LOKR_W1_B = "lokr_w1_b"
    LOKR_W2 = "lokr_w2"
    LOKR_W2_A = "lokr_w2_a"
    LOKR_W2_B = "lokr_w2_b"
    LOKR_T1 = "lokr_t1"
    LOKR_T2 = "lokr_t2"
    HADA_W1_A = "hada_w1_a"
    HADA_W1_B = "hada_w1_b"
    HADA_W2_A = "hada_w2_a"
    HADA_W2_B = "hada_w2_b"
    HADA_T1 = "hada_t1"
    HADA_T2 = "hada_t2"
    MAGNITUDE = "magnitude"    # DoRA magnitude (PEFT lora_magnitude_vector, LyCORIS dora_scale)
    SCALAR = "scalar"          # LyCORIS use_scalar
    NORM = "norm"              # norm weights / biases (LyCORIS w_norm / b_norm, LayerNorm, GroupNorm)
    REGULAR = "regular"

    @property
    def family(self) -> str:
        if self.value.startswith("lora_"):
            return "lora"
        if self.value.startswith("lokr_"):
            return "lokr"
        if self.value.startswith("hada_"):
            return "loha"
        return "other"


#: role tokens as they appear in names, longest first so that ``lokr_w1_a`` wins over ``lokr_w1``
_TOKENS: dict[str, Role] = {
    "lora_down": Role.LORA_A, "lora_up": Role.LORA_B, "lora_mid": Role.LORA_MID,
    "lora_A": Role.LORA_A, "lora_B": Role.LORA_B,
    "lora_embedding_A": Role.LORA_A, "lora_embedding_B": Role.LORA_B,
    "lora_magnitude_vector": Role.MAGNITUDE, "dora_scale": Role.MAGNITUDE,
    **{f"lokr_{s}": Role(f"lokr_{s}") for s in ("w1_a", "w1_b", "w2_a", "w2_b", "w1", "w2", "t1", "t2")},
    **{f"hada_{s}": Role(f"hada_{s}") for s in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    "scalar": Role.SCALAR, "w_norm": Role.NORM, "b_norm": Role.NORM,
}
_TOKEN_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<token>" + "|".join(sorted(map(re.escape, _TOKENS), key=len, reverse=True)) + r")"
    r"(?:\.(?P<index>\d+))?(?:\.(?P<adapter>(?!weight$)[A-Za-z0-9_\-]+))?(?:\.weight)?$")
# diffusers: <module>.lora.down.weight, <module>.lora_linear_layer.up.weight, <module>.to_q_lora.down.weight
_DIFFUSERS_RE = re.compile(r"^(?P<module>.+?\.(?:lora|lora_linear_layer|[A-Za-z0-9_]+_lora))\.(?P<token>down|up)\.weight$")
_NORM_RE = re.compile(r"(^|[._])(norm\d*|ln_\w+|layernorm|layer_norm|group_norm)([._]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class NameInfo:
    name: str
    role: Role
    module: str  # pairing key: module prefix (+ split index, + PEFT adapter)


def classify(name: str) -> NameInfo:
    """Role and module key of one parameter name (``Role.REGULAR`` and the name itself if unrecognised)."""
    match = _TOKEN_RE.match(name)
    if match:
        role = _TOKENS[match["token"]]
        module = match["module"]
        if match["index"] is not None and role in (Role.LORA_A, Role.LORA_B, Role.LORA_MID):
            module = f"{module}[{match['index']}]"
        if match["adapter"]:
            module = f"{module}@{match['adapter']}"
        return NameInfo(name, role, module)
    match = _DIFFUSERS_RE.match(name)
    if match:
        return NameInfo(name, Role.LORA_A if match["token"] == "down" else Role.LORA_B, match["module"])
    if _NORM_RE.search(name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name):
        return NameInfo(name, Role.NORM, name)
    return NameInfo(name, Role.REGULAR, name)


#: the members a module needs to be complete, per family (alternatives: a full factor or both its halves)
_REQUIRED = {
    "lora": [(Role.LORA_A,), (Role.LORA_B,)],
    "lokr": [(Role.LOKR_W1, (Role.LOKR_W1_A, Role.LOKR_W1_B)), (Role.LOKR_W2, (Role.LOKR_W2_A, Role.LOKR_W2_B))],
    "loha": [(Role.HADA_W1_A,), (Role.HADA_W1_B,), (Role.HADA_W2_A,), (Role.HADA_W2_B,)],
}


@dataclass
class AdapterModule:
    """The members of one adapter module: role -> parameter name."""

    key: str
    family: str
    members: dict[Role, str] = field(default_factory=dict)
    extras: dict[Role, str] = field(default_factory=dict)  # magnitude / scalar attached to the module

    @property
    def missing(self) -> list[str]:
        out = []
        for requirement in _REQUIRED.get(self.family, []):
            ok = False
            for option in requirement:
                roles = option if isinstance(option, tuple) else (option,)
                ok |= all(r in self.members for r in roles)
            if not ok:
                out.append(" or ".join("+".join(r.value for r in (o if isinstance(o, tuple) else (o,))) for o in requirement))
        return out

    @property
    def complete(self) -> bool:
        return not self.missing


@dataclass
class Pairing:
    infos: dict[str, NameInfo]
    modules: dict[str, AdapterModule]
    unpaired: list[str]                     # names of adapter members whose module is incomplete
    duplicates: list[str]                   # names whose role occurs twice in one module

    def role(self, name: str) -> Role:
        return self.infos[name].role

    def module_of(self, name: str) -> AdapterModule | None:
        return self.modules.get(self.infos[name].module)

    def partner(self, name: str, role: Role) -> str | None:
        module = self.module_of(name)
        return module.members.get(role) if module is not None and module.complete else None


def pair(names: Iterable[str]) -> Pairing:
    """Classify every name and group adapter members by module key."""
    infos: dict[str, NameInfo] = {}
    modules: dict[str, AdapterModule] = {}
    duplicates: list[str] = []
    extras: list[NameInfo] = []
    for name in names:
        info = classify(name)
        infos[name] = info
        family = info.role.family
        if family == "other":
            if info.role in (Role.MAGNITUDE, Role.SCALAR):
                extras.append(info)
            continue
        module = modules.setdefault(info.module, AdapterModule(info.module, family))
        if module.family != family or info.role in module.members:
            duplicates.append(name)
            continue
        module.members[info.role] = name
    for info in extras:  # DoRA magnitude / LyCORIS scalar belong to the adapter module of the same prefix
        module = modules.get(info.module)
        if module is not None:
            module.extras[info.role] = info.name
    unpaired = sorted(n for m in modules.values() if not m.complete for n in m.members.values())
    return Pairing(infos, modules, unpaired, duplicates)
