"""Where each tensor the optimizer trains lives: the one owner of the map from param groups to packs.

torch.optim lets code change ``param_groups`` after construction, and training engines do: DeepSpeed ZeRO-1/2
replaces each group's parameters by one flat fp32 partition, then steps one group at a time by setting
``optimizer.param_groups = [that group]``; accelerate's FSDP2 support swaps every group's parameters for sharded
ones; users replace parameters, reorder groups, flip ``requires_grad`` or step a subset. So nothing here goes by
position:

* a **group** is known by identity (the dict object; a dict seen for the first time is adopted, its home index the
  order in which groups became known), and its packs by the identity, shape and ``requires_grad`` of the tensors it
  holds now (its *signature*). A group whose signature changed is planned again; state of the tensors it still
  holds is carried over, and state of tensors it dropped stays in ``optimizer.state`` (as in torch.optim), so that
  it continues if they come back.
* a group's tensors become **members**, the tensors packs are planned over: the parameter itself; for a flat
  partition made by an engine (see ``engine/distributed.py``), views of its fragments with the shapes of the model
  parameters they stand for; for a sharded DTensor (FSDP2, see ``engine/sharding.py``), its local shard (one
  tensor object per parameter for as long as it lives, re-pointed if the engine moves the shard's storage).
  ``grad(member)`` reads the gradient through the same map, ``shard(member)`` says where its rows lie.

Techniques see members only: what a member is a view of is this module's business.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import distributed, sharding
from .pack import Pack


@dataclass
class _Planned:
    group: dict[str, Any]
    signature: tuple
    members: list[torch.Tensor]
    packs: list[Pack] = field(default_factory=list)


class Binding:
    def __init__(self) -> None:
        #: every group the optimizer has known, in the order it became known (a pack's ``group_index`` is its place here)
        self.groups: list[dict[str, Any]] = []
        self._index: dict[int, int] = {}
        #: the tensors each group was built with (by home index): what an engine's flat partition stands for; held
        #: weakly, so that parameters a user or an engine replaced can be freed
        self._origins: dict[int, list[weakref.ref]] = {}
        self._planned: dict[int, _Planned] = {}
        #: a member that is a view of part of a flat partition: id(member) -> its fragment
        self._fragments: dict[int, distributed.Fragment] = {}
        #: a group's tensors as members, by home index, when the engine's form of them was last examined
        self._expanded: dict[int, tuple[tuple, list[torch.Tensor]]] = {}
        #: replicas of tensors split between ranks, by home index (see engine/distributed.py)
        self._exchanges: dict[int, list[distributed.Exchange]] = {}
        #: id(member) -> (member, home index) of every planned member
        self._home_of: dict[int, tuple[torch.Tensor, int]] = {}
        #: a member that is the local shard of a DTensor: id(member) -> its shard
        self._shards: dict[int, sharding.Shard] = {}
        #: id(DTensor parameter) -> (weak reference to it, the member standing for its local shard)
        self._aliases: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        #: whether any group was found to be an engine's flat partition (the same on every rank)
        self.partitioned = False
        #: the adapter module of a parameter (set by the optimizer from the names it learnt)
        self.module_of: Callable[[torch.Tensor], str | None] = lambda p: None

    # -- groups ---------------------------------------------------------------------------------------------
    def home(self, group: dict[str, Any]) -> int:
        """The home index of ``group`` (adopted if new)."""
        index = self._index.get(id(group))
        if index is None or self.groups[index] is not group:
            index = self._index[id(group)] = len(self.groups)
            self.groups.append(group)
            self._origins[index] = [weakref.ref(p) for p in group["params"]]
        return index

    @staticmethod
    def signature(group: dict[str, Any]) -> tuple:
        return tuple((id(p), tuple(p.shape), p.dtype, p.requires_grad) for p in group["params"])

    # -- members --------------------------------------------------------------------------------------------
    def members(self, group: dict[str, Any]) -> list[torch.Tensor]:
        """The trainable tensors of ``group`` as packs see them (see the module docstring)."""
        index = self.home(group)
        signature = self.signature(group)
        cached = self._expanded.get(index)
        if cached is not None and cached[0] == signature:
            return cached[1]
        for old in cached[1] if cached is not None else ():
            self._fragments.pop(id(old), None)
            self._shards.pop(id(old), None)
        out: list[torch.Tensor] = []
        exchanges: list[distributed.Exchange] = []
        origins = [p for p in (ref() for ref in self._origins[index]) if p is not None]
        known = {id(p) for p in origins}
        for j, p in enumerate(group["params"]):
            if sharding.is_dtensor(p):  # FSDP2: built on sharded parameters, or given them afterwards (accelerate)
                shard = sharding.shard_of(p, f"parameter {j} of param group {index}")
                if p.requires_grad and shard.numel:  # (kept with an empty shard here: packs line up across ranks)
                    member = self._alias(p)
                    self._shards[id(member)] = shard
                    out.append(member)
                continue
            if id(p) in known:
                if p.requires_grad and p.numel():
                    out.append(p)
                continue
            found = distributed.partition(p, origins, index, self.module_of)
            if found is None:  # a tensor put in after construction, of no engine we know: itself
                if p.requires_grad and p.numel():
                    out.append(p)
                continue
            self.partitioned = True
            if not p.requires_grad:
                continue
            fragments, exchange = found
            for fragment in fragments:
                member = fragment.member()
                self._fragments[id(member)] = fragment
                out.append(member)
            if exchange is not None:
                exchanges.append(exchange)
        self._expanded[index] = (signature, out)
        self._exchanges[index] = exchanges
        return out

    def _alias(self, p: torch.Tensor) -> torch.Tensor:
        """The member standing for DTensor ``p``'s local shard: the same tensor object for as long as ``p`` lives
        (state is keyed by it), sharing the shard's storage."""
        local = sharding.local_tensor(p)
        entry = self._aliases.get(id(p))
        if entry is not None and entry[0]() is p:
            member = entry[1]
            if member.data_ptr() != local.data_ptr() and local.numel():
                member.set_(local)  # FSDP2 re-pads a shard at its lazy initialisation: same values, new storage
            return member
        member = torch.empty(0, dtype=local.dtype, device=local.device).set_(local)
        self._aliases[id(p)] = (weakref.ref(p), member)
        return member

    def member_for(self, p: torch.Tensor) -> torch.Tensor | None:
        """The member standing for sharded parameter ``p`` (None if ``p`` is not one)."""
        entry = self._aliases.get(id(p))
        return entry[1] if entry is not None and entry[0]() is p else None

    def as_member(self, p: torch.Tensor) -> torch.Tensor:
        """The member standing for ``p`` if it is a sharded parameter, else ``p``."""
        member = self.member_for(p)
        return p if member is None else member

    def gather(self, group: dict[str, Any]) -> None:
        """Before ``group`` steps: the whole values and gradients of its replicas (a collective: every rank steps
        the same groups in the same order under the engines that make replicas); sharded members re-pointed if
        their engine moved their storage."""
        if self.sharded:  # (a loop over the group's tensors only where FSDP2 put sharded ones in)
            for p in group["params"]:
                if id(p) in self._aliases:
                    self._alias(p)
        for exchange in self._exchanges.get(self.home(group), ()):
            exchange.gather()

    def write_back(self, group: dict[str, Any]) -> None:
        """After ``group`` stepped: this rank's parts of its replicas into the engine's partition."""
        for exchange in self._exchanges.get(self.home(group), ()):
            exchange.write_back()

    def all_members(self, groups: list[dict[str, Any]] | None = None) -> list[tuple[int, torch.Tensor]]:
        """(home index, member) of every trainable member of ``groups`` (default: every known group)."""
        return [(self.home(g), m) for g in (self.groups if groups is None else groups) for m in self.members(g)]

    def fragments(self) -> list[distributed.Fragment]:
        return list(self._fragments.values())

    def fragment(self, member: torch.Tensor) -> distributed.Fragment | None:
        return self._fragments.get(id(member))

    @property
    def sharded(self) -> bool:
        """Whether any group holds sharded parameters (FSDP2)."""
        return bool(self._aliases)

    def counted(self, member: torch.Tensor) -> bool:
        """Whether this rank counts ``member`` in sums over all tensors completed across ranks (see Fragment.counted)."""
        fragment = self._fragments.get(id(member))
        return fragment is None or fragment.counted

    def shard(self, member: torch.Tensor) -> sharding.Shard | None:
        return self._shards.get(id(member))

    def source(self, member: torch.Tensor) -> torch.Tensor:
        """The model parameter ``member`` stands for (itself, unless an engine partitioned or sharded it)."""
        fragment, shard = self._fragments.get(id(member)), self._shards.get(id(member))
        return fragment.source if fragment is not None else shard.param if shard is not None else member

    def grad(self, member: torch.Tensor) -> torch.Tensor | None:
        shard = self._shards.get(id(member))
        if shard is not None:
            return sharding.local_grad(shard)
        fragment = self._fragments.get(id(member))
        return member.grad if fragment is None else fragment.grad()

    # -- packs ----------------------------------------------------------------------------------------------
    def current(self, group: dict[str, Any]) -> list[Pack] | None:
        """The packs of ``group`` if they were planned for the tensors it holds now, else None."""
        planned = self._planned.get(self.home(group))
        return planned.packs if planned is not None and planned.signature == self.signature(group) else None

    def plan(self, group: dict[str, Any], members: list[torch.Tensor],
             make: Callable[[int, dict[str, Any], list[torch.Tensor]], list[Pack]]) -> list[Pack]:
        """New packs for ``group``'s ``members`` (``make(home index, group, members)``), replacing its old ones."""
        index = self.home(group)
        packs = make(index, group, members)
        old = self._planned.get(index)
        for m in old.members if old is not None else ():
            self._home_of.pop(id(m), None)
        self._home_of.update((id(m), (m, index)) for m in members)
        self._planned[index] = _Planned(group, self.signature(group), members, packs)
        return packs

    def group_of(self, member: torch.Tensor) -> dict[str, Any] | None:
        """The group whose packs train ``member`` (as last planned; None if none does)."""
        entry = self._home_of.get(id(member))
        return self.groups[entry[1]] if entry is not None and entry[0] is member else None

    def planned(self, group: dict[str, Any]) -> list[Pack] | None:
        """The packs last planned for ``group`` (None if none), without checking its tensors."""
        entry = self._planned.get(self.home(group))
        return entry.packs if entry is not None else None

    def forget(self) -> None:
        self._planned.clear()
        self._home_of.clear()

    @property
    def any_planned(self) -> bool:
        return bool(self._planned)

    def describe(self) -> str | None:
        """One line on the engine forms in use (None when every member is a parameter itself)."""
        return distributed.describe(list(self._fragments.values()))
