"""Reporting for HinaOptimizer: the methods that read device values (``.item()``), kept apart from the step.

Nothing here runs inside ``step()``. TensorBoard integrations and the kohya hook call ``stats()`` when
they log.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .compiled import summary as compiled_summary


class Reporting:
    """Mixed into :class:`~sd_hina_plugin.engine.base.HinaOptimizer`."""

    def diagnose_lora_pairing(self) -> dict[str, Any]:
        """Per-group role counts, complete modules, unpaired names with shapes, the role of every parameter."""
        return self._lora.diagnose(self._groups_members())

    def _groups_members(self) -> list[tuple[str, list[torch.Tensor]]]:
        """(name, trainable tensors) of each group in ``param_groups`` (tensors as the packs see them)."""
        return [(self.group_name(i), self._binding.members(g)) for i, g in enumerate(self.param_groups)]

    def lokr_stats(self, per_module: bool = False) -> dict[str, float]:
        """Norms of LoKr factors and of their Kronecker products (||w1 ⊗ w2|| = ||w1|| ||w2||). Syncs."""
        from ..lora.factors import SIDES, side_norms

        modules = self._lora.complete("lokr")
        if not modules:
            return {}
        members = [self._lora.members(m) for m in modules]
        with torch.no_grad():
            w1, w2 = (side_norms(members, *side) for side in SIDES["lokr"])
            kron = w1 * w2
        out = {}
        for label, values in (("w1_norm", w1), ("w2_norm", w2), ("kron_norm", kron)):
            out[f"hina/lokr/{label}_mean"] = values.mean().item()
            out[f"hina/lokr/{label}_max"] = values.max().item()
        if per_module:
            for m, a, b, k in zip(modules, w1.tolist(), w2.tolist(), kron.tolist()):
                out.update({f"hina/lokr/{m.key}/w1_norm": a, f"hina/lokr/{m.key}/w2_norm": b, f"hina/lokr/{m.key}/kron_norm": k})
        return out

    def _mask_technique(self, p: torch.Tensor) -> tuple[dict[str, Any], Any, torch.Tensor] | None:
        """(group of ``p``, its lr-mask technique, the tensor the packs train for ``p``: a sharded parameter's (FSDP2)
        local shard, else ``p``), or None if the optimizer has no lr mask or ``p`` no state yet."""
        p = self._binding.as_member(p)
        group = self._binding.group_of(p)
        if group is None or not any(g is group for g in self.param_groups):
            return None
        for tech in self.techniques(group):
            if hasattr(tech, "mask_of") and self.state.get(p):
                return group, tech, p
        return None

    def lr_mask(self, p: torch.Tensor) -> torch.Tensor | None:
        """The per-element lr multiplier of parameter ``p`` (fp32, relative to its group's lr; the effective lr is
        ``group["lr"] * lr_mask(p)``), or None if the optimizer has no lr mask or ``p`` no state yet."""
        found = self._mask_technique(p)
        if not found:
            return None
        group, tech, member = found
        return tech.mask_of(self, group, member)

    def lr_in_lr_units(self, p: torch.Tensor) -> torch.Tensor | None:
        """The per-element lr of ``p`` (``group["lr"] * lr_mask(p)``, a new fp32 tensor shaped like ``p``), or None
        without an lr mask. Also read as ``optimizer.state[p]['lr_mask']``, the upstream fork's key."""
        found = self._mask_technique(p)
        if not found:
            return None
        group, tech, member = found
        return tech.mask_of(self, group, member) * float(group["lr"])

    def group_name(self, index: int) -> str:
        return str(self.param_groups[index].get("hina_desc") or f"group{index}")

    def stats(self) -> dict[str, float]:
        """Flat ``hina/...`` scalars for TensorBoard. The only method that reads device values."""
        out: dict[str, float] = {}
        for i, group in enumerate(self.param_groups):
            lr = group["lr"]
            out[f"hina/lr/{self.group_name(i)}"] = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
        for gi, avg_lr in self._avg_lrs().items():
            out[f"hina/avg_lr/{self.group_name(gi)}"] = avg_lr
        for key, value in self._stats.items():
            out[key] = float(value.item() if isinstance(value, torch.Tensor) else value)
        out.update(self.lokr_stats())
        return out

    def _avg_lrs(self) -> dict[int, float]:
        """Per group with an lr mask: its lr times the mask's mean over the group's elements (from the per-pack
        means the mask keeps on the device). Reads device values."""
        weighted: dict[int, list[float]] = {}
        for entry in self.mask_means.values():
            if entry is None:  # a pack whose mask has not run yet
                continue
            gi, mean, count = entry
            acc = weighted.setdefault(gi, [0.0, 0])
            acc[0] += float(mean.item()) * count
            acc[1] += count
        # packs know their group by its home index (engine/binding.py); reported under its place in param_groups
        place = {id(g): i for i, g in enumerate(self.param_groups)}
        out = {}
        for gi, (total, count) in weighted.items():
            group = self._binding.groups[gi]
            if id(group) in place:
                out[place[id(group)]] = float(group["lr"]) * total / count
        return out

    def state_bytes(self) -> int:
        """Bytes of optimizer state (distinct storages of every state tensor)."""
        seen: dict[int, int] = {}
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    storage = value.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def get_optimization_info(self) -> dict[str, Any]:
        diag = self._lora.diagnose(self._groups_members())
        roles = self._role_counts(diag)
        groups = []
        for i, group in enumerate(self.param_groups):
            params = self._binding.members(group)
            groups.append({
                "name": self.group_name(i),
                "params": len(params),
                "numel": sum(p.numel() for p in params),
                "lr": float(group["lr"]) if not isinstance(group["lr"], torch.Tensor) else group["lr"].item(),
                "step": group["step"],
                "techniques": [t.name for t in self.techniques(group)],
            })
        numel = sum(g["numel"] for g in groups)
        return {
            "optimizer": self.NAME,
            "config": self.config.as_dict(),
            "techniques": {t.name: t.summary for t in self.TECHNIQUES},
            "param_groups": groups,
            "total_params": numel,
            "state_bytes": self.state_bytes(),
            "state_bytes_per_param": self.state_bytes() / numel if numel else math.nan,
            "scratch_bytes": self._pool.nbytes(),
            "packs": [len(p) for p in self._packs] if self._packs is not None else None,
            "compile": compiled_summary(self._compiled),
            "distributed": self._binding.describe(),
            "lora": self._lora_info(diag),
            "notes": self.notes(),
            # the upstream fork's keys, for monitoring code written against it
            "optimizer_type": self.NAME,
            "features": {t.name: any(t.enabled(g) for g in self.param_groups) for t in self.TECHNIQUES if t.switch is not None},
            "lora_stats": {"lora_a": roles.get("lora_a", 0), "lora_b": roles.get("lora_b", 0), "pairs": len(diag["pairs"]),
                           "modules": diag["modules"], "names_source": diag["names_source"], "roles": roles},
            "lokr_stats": self.lokr_stats() if self._packs is not None else {},
            "training_stats": {"global_step": max((g["step"] for g in self.param_groups), default=0),
                               "param_groups": len(self.param_groups), "total_params": numel},
        }

    @property
    def param_groups_metadata(self) -> dict[int, dict[str, Any]]:
        """Per param group: its name and the adapter pairs whose members it holds (``lora_pairs``: (A name, B name)),
        as the upstream fork exposed them."""
        from ..lora.names import Role

        out = {i: {"name": self.group_name(i), "lora_pairs": [], "lokr_modules": []} for i in range(len(self.param_groups))}
        for module in self._lora.pairing.modules.values():
            if not module.complete:
                continue
            members = module.members
            first = self._lora.params[next(iter(members.values()))]
            home = self._binding.groups[self._lora.group_of[id(first)]]
            meta = next((out[i] for i, g in enumerate(self.param_groups) if g is home), None)
            if meta is None:  # a group no longer in param_groups
                continue
            if module.family == "lora" and Role.LORA_A in members and Role.LORA_B in members:
                meta["lora_pairs"].append((members[Role.LORA_A], members[Role.LORA_B]))
            elif module.family == "lokr":
                meta["lokr_modules"].append(module.key)
        return out

    def _get_group_lr(self, group: dict[str, Any]) -> float:
        """The group's average per-element lr: ``hina/avg_lr`` of that group (its lr where it has no mask). Reads
        device values (the upstream fork's monitoring call)."""
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        lr = group["lr"]
        return self._avg_lrs().get(gi, float(lr.item() if isinstance(lr, torch.Tensor) else lr))

    @staticmethod
    def _role_counts(diag: dict[str, Any]) -> dict[str, int]:
        roles: dict[str, int] = {}
        for entry in diag["parameters"]:
            roles[entry["role"]] = roles.get(entry["role"], 0) + 1
        return roles

    def _lora_info(self, diag: dict[str, Any]) -> dict[str, Any]:
        roles = self._role_counts(diag)
        info = {"names_source": diag["names_source"], "roles": roles, "modules": diag["modules"],
                "unpaired": len(diag["unpaired"]), "split_across_groups": len(diag["split_across_groups"]),
                "role_techniques": {}}
        for tech in self.TECHNIQUES:
            if tech.uses_roles:
                active = any(tech.enabled(g) for g in self.param_groups)
                note = "on" if active else "off"
                applies = getattr(tech, "applies", None)
                if active and applies is not None and not applies(self):
                    note = "off: LoRA pairs are split across param groups (kohya loraplus_lr_ratio already sets their lrs)"
                elif active and not any(diag["modules"].values()):
                    note = (f"off: no LoRA/LoKr/LoHa module found (names from {diag['names_source']}); pass "
                            "model.named_parameters() or call attach_names()")
                info["role_techniques"][tech.name] = note
        return info
