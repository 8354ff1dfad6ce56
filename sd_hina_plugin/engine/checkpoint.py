"""Checkpoints of a HinaOptimizer: ``state_dict``, ``load_state_dict``, ``copy.deepcopy`` and ``pickle``.

The format is torch.optim's (``{"state": {index: {key: tensor}}, "param_groups": [...]}``) plus a ``"hina"`` entry
(format version, optimizer name, random generator states). State is keyed by the index of each tensor in
``param_groups``. Where an engine replaced a group's parameters by a flat partition (DeepSpeed ZeRO-1/2, see
``engine/distributed.py``), the partition's entry holds ``{"hina.fragments": {i: {key: tensor}}}``: the state of
each tensor this rank trains from it, by the place ``i`` of its parameter in the group, so that the same number of
ranks loads it back exactly.

For parameters sharded between ranks (FSDP2, ``engine/sharding.py``), a tensor's state is keyed by the parameter's
index as usual, its values DTensors laid out as ``engine/sharding.wrap_state`` says, so that
``torch.distributed.checkpoint`` saves and loads them sharded (and reshards per-element, per-row, per-column and
per-tensor state onto fewer ranks; on more, DCP reports the new ranks' random streams missing, each rank's being
saved under its own key). ``torch.distributed.checkpoint.state_dict`` keeps only ``"state"``
and ``"param_groups"``: the ``"hina"`` entry is therefore repeated in the first param group, where it reads it back.
"""

from __future__ import annotations

from typing import Any

import torch

from . import distributed, sharding

FORMAT_VERSION = 1
#: the state entry of a flat partition: its fragments' states by offset
FRAGMENTS = "hina.fragments"
#: what identifies the optimizer and format, and holds its random generators' states
HINA = "hina"


class Checkpointing:
    """Mixed into :class:`~sd_hina_plugin.engine.base.HinaOptimizer`."""

    def __getstate__(self) -> dict[str, Any]:
        """``copy.deepcopy(optimizer)`` and ``pickle``: the parameters, the constructor's arguments, the names it
        learnt and a state dict; :meth:`__setstate__` builds the optimizer again from them (its packs hold views
        into flat buffers that cannot be copied attribute by attribute)."""
        named = [] if self._lora.source == "shape rules" else \
            [(self._lora.name_of[id(p)], p) for g in self.param_groups for p in g["params"] if id(p) in self._lora.name_of]
        groups = [{"params": list(g["params"]), **({"param_names": list(g["param_names"])} if "param_names" in g else {})}
                  for g in self.param_groups]
        return {"groups": groups, "kwargs": self.config.as_dict(), "named": named, "saved": self.state_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        type(self).__init__(self, state["groups"], **state["kwargs"])
        if state["named"]:
            self.attach_names(state["named"])
        self.load_state_dict(state["saved"])

    def state_dict(self) -> dict[str, Any]:
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
            groups.append({**{k: v for k, v in group.items() if k not in ("params", HINA)},
                           "params": [index[id(p)] for p in group["params"]]})
        state: dict[int, dict[str, Any]] = {}
        kinds = {id(m): pack.kinds for pack in self._all_planned() for m in pack.params}
        for p, entry in self.state.items():
            real = dict(entry)  # a plain dict: no derived keys, no back-reference
            fragment, shard = self._binding.fragment(p), self._binding.shard(p)
            if not real:
                continue
            if shard is not None:  # a local shard: its parameter's state, as DTensors
                if id(shard.param) in index:
                    known = kinds.get(id(p), {})
                    state[index[id(shard.param)]] = {
                        k: sharding.wrap_state(shard, v, known.get(k, "elem")) if isinstance(v, torch.Tensor) else v
                        for k, v in real.items()}
            elif fragment is None:
                if id(p) in index:  # (state of a tensor no group holds any more stays out, where torch would fail)
                    state[index[id(p)]] = real
            elif id(fragment.owner) in index:
                state.setdefault(index[id(fragment.owner)], {}).setdefault(FRAGMENTS, {})[fragment.index] = real
        sd: dict[str, Any] = {"state": state, "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        # each rank's random stream (stochastic rounding) under its own key: torch.distributed.checkpoint keeps one copy
        # of what every rank saves under the same key, and a checkpoint of 2 ranks then loads in one process (rank 0's)
        rank = distributed.rank()
        # every device's generator, made now if no step has drawn from it yet (it starts from the fixed seed either
        # way): a checkpoint loader that takes the keys to load from a fresh optimizer's state dict (DCP) finds them
        for device in {p.device for group in self.param_groups for p in group["params"]}:
            self._generator(device)
        # keyed by device type where a rank has one device of it (its GPU is cuda:1 on one machine, cuda:0 on another)
        types = [torch.device(dev).type for dev in self._generators]
        rng = {f"{torch.device(dev).type if types.count(torch.device(dev).type) == 1 else dev}@rank{rank}": gen.get_state()
               for dev, gen in self._generators.items()}
        sd[HINA] = {"format": FORMAT_VERSION, "optimizer": self.NAME, "rng": rng}
        sd["magic_version"] = FORMAT_VERSION  # the upstream fork's version key, for checks written against it
        return self._repeat_meta(sd)

    def _repeat_meta(self, sd: dict[str, Any]) -> dict[str, Any]:
        """The ``"hina"`` entry repeated in the first param group (see the module docstring): the same dict, so that
        what a subclass adds to it after this (C-Optim's context) is there too."""
        if sd["param_groups"]:
            sd["param_groups"][0][HINA] = sd[HINA]
            # and, with sharded parameters, in the live first group: DCP's flattened form (flatten_optimizer_state_dict,
            # torchtitan's setting) takes a group's entries from the optimizer's own param_groups when it loads
            if self._binding.sharded:
                self.param_groups[0][HINA] = sd[HINA]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        meta = self.saved_meta(state_dict)
        if not isinstance(meta, dict) or meta.get("optimizer") != self.NAME:
            found = meta.get("optimizer") if isinstance(meta, dict) else "an optimizer outside sd_hina_plugin"
            raise ValueError(f"{self.NAME}.load_state_dict: this state dict was saved by {found}, not by {self.NAME}")
        if meta.get("format", 0) > FORMAT_VERSION:
            raise ValueError(f"{self.NAME}.load_state_dict: state format {meta['format']} is newer than this version ({FORMAT_VERSION}); upgrade sd_hina_plugin")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{self.NAME}.load_state_dict: the checkpoint has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)} (did the network, LoRA+ or block-lr settings change since it was saved?)")
        id_map: dict[Any, tuple[torch.Tensor, dict[str, Any]]] = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{self.NAME}.load_state_dict: param group {gi} has {len(saved['params'])} parameters in the checkpoint "
                    f"and {len(group['params'])} here")
            id_map.update((sid, (p, group)) for sid, p in zip(saved["params"], group["params"]))
        for saved, group in zip(saved_groups, self.param_groups):
            for key, value in saved.items():
                if key not in ("params", "param_names", HINA):
                    group[key] = value
        if state_dict["state"] or self._binding.any_planned:
            # (a state dict without state, e.g. accelerate's round trip through state_dict() before it shards the
            # parameters, allocates nothing: state made for tensors about to be replaced would outlive them)
            self._init_state()
        for sid, saved_state in state_dict["state"].items():
            if sid not in id_map:
                raise ValueError(f"{self.NAME}.load_state_dict: state for unknown parameter index {sid!r}")
            p, group = id_map[sid]
            member = self._binding.member_for(p)
            if member is not None:  # a sharded parameter: its local shard's state, from DTensors
                kinds = next((pack.kinds for pack in self._binding.planned(group) or () if any(m is member for m in pack.params)), {})
                ours = self.state[member]
                local = {k: sharding.unwrap_state(v, ours[k], kinds.get(k, "elem"), f"{self.NAME}.load_state_dict: {k} of parameter {sid}")
                         if k in ours else v for k, v in saved_state.items()}
                self._load_entry(member, sid, local)
            elif FRAGMENTS in saved_state:
                members = {f.index: m for m in self._binding.members(group)
                           if (f := self._binding.fragment(m)) is not None and f.owner is p}
                for key, entry in saved_state[FRAGMENTS].items():
                    if key not in members:
                        raise ValueError(
                            f"{self.NAME}.load_state_dict: the checkpoint has state for parameter {key} of group {sid}'s "
                            f"partition, which this rank does not train (was it saved with another number of ranks?)")
                    self._load_entry(members[key], f"{key} of partition {sid}", entry)
            else:
                self._load_entry(p, sid, saved_state)
        self._load_streams(meta.get("rng", {}))
        # lr-mask means (hina/avg_lr) are re-recorded from the loaded masks at the next step: those of before (a fresh
        # mask's, from DCP's initialising step) would stand, since a frozen mask is not read again
        self.mask_means.clear()
        # an iteration left open (DeepSpeed's group-by-group calls, interrupted) does not carry into the loaded state
        self._iteration.take()
        self.iteration_sums.clear()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_streams(self, saved: dict[str, torch.Tensor]) -> None:
        """The random generators' states: for each device this rank's parameters are on, the stream saved for this
        rank on it where the checkpoint has one (FSDP2: each rank's own), else the one saved by rank 0 for a device
        of the same type (a checkpoint saved by the main process only and loaded by every rank of DDP, whose ranks
        must go on drawing the same numbers: rank r's GPU is cuda:r where rank 0's was cuda:0)."""
        rank = distributed.rank()
        own, first = {}, {}
        for key, rng in saved.items():
            dev, _, owner = key.partition("@rank")
            if not owner or int(owner) == rank:  # (no owner: a checkpoint of an earlier version, one stream per device)
                own[dev] = rng
            if not owner or int(owner) == 0:
                first.setdefault(torch.device(dev).type, rng)
        devices = {p.device for group in self.param_groups for p in group["params"]}
        for device in devices | {torch.device(dev) for dev in own if ":" in dev or dev == "cpu"}:
            rng = own.get(str(device), own.get(device.type, first.get(device.type)))
            if rng is not None and (device.type == "cpu" or torch.cuda.is_available()):
                self._generator(device).set_state(rng.cpu())

    @staticmethod
    def saved_meta(state_dict: Any) -> dict[str, Any] | None:
        """The ``"hina"`` entry of a state dict: at the top, or (through torch.distributed.checkpoint's state_dict
        helpers, which keep only "state" and "param_groups") in the first param group."""
        if not isinstance(state_dict, dict):
            return None
        meta = state_dict.get(HINA)
        if meta is None and state_dict.get("param_groups"):
            meta = state_dict["param_groups"][0].get(HINA)
        return meta

    def _load_entry(self, p: torch.Tensor, sid: Any, saved_state: dict[str, Any]) -> None:
        """Copy one tensor's saved state into its already allocated state (dtypes kept)."""
        ours = self.state[p]
        missing, extra = sorted(set(ours) - set(saved_state)), sorted(set(saved_state) - set(ours))
        if missing or extra:
            raise ValueError(
                f"{self.NAME}.load_state_dict: state of parameter {sid} (shape {tuple(p.shape)}) does not match this "
                f"configuration: missing {missing}, unexpected {extra} (were optim_bits or a technique switch changed?)")
        for key, value in saved_state.items():
            if isinstance(value, torch.Tensor):
                if value.shape != ours[key].shape:
                    raise ValueError(f"{self.NAME}.load_state_dict: {key} of parameter {sid} has shape {tuple(value.shape)}, expected {tuple(ours[key].shape)}")
                ours[key].copy_(value)
            else:
                ours[key] = value
