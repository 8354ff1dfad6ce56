"""The seed's reporting API of the adaptive optimizers: importance, relationships, buffer pool.

These methods read device values; they are never called from ``step()``.
"""

from __future__ import annotations

import torch


class AdaptiveReports:
    """The seed's reporting API of the adaptive optimizers (reads device values: call outside step())."""

    def get_relationship_summary(self) -> dict:
        names, partner, compat = self._per_tensor_table("adapt.partner", "adapt.compat")
        pairs = []
        for i, (j, c) in enumerate(zip(partner, compat)):
            if j > 0 and i < j - 1:
                pairs.append({"a": names[i], "b": names[int(j) - 1], "compatibility": round(c, 4),
                              "kind": "adapter pair" if c == 1.0 else "discovered"})
        return {"total_relationships": len(pairs), "relationships": pairs,
                "discovery_interval": self.param_groups[0]["relationship_discovery_interval"]}

    def get_importance_analysis(self) -> dict:
        names, importance = self._per_tensor_table("adapt.importance")
        if not importance:
            return {"importance_statistics": {}, "high_importance_params": 0, "low_importance_params": 0}
        values = torch.tensor(importance)
        mean = values.mean().item()
        ranked = sorted(zip(importance, names), reverse=True)
        return {
            "importance_statistics": {"mean": mean, "max": values.max().item(), "min": values.min().item(),
                                      "std": values.std(unbiased=False).item()},
            "high_importance_params": int((values > 1.5 * mean).sum()),
            "low_importance_params": int((values < 0.5 * mean).sum()),
            "top": [{"name": n, "importance": v} for v, n in ranked[:5]],
            "bottom": [{"name": n, "importance": v} for v, n in ranked[-5:]],
        }

    def get_buffer_pool_stats(self) -> dict:
        """The reusable scratch buffers the step works in (one set per device, sized to the largest pack, shared by
        every optimizer of the process: see ``engine/pack.py`` ScratchPool)."""
        buffers = self._pool.describe()
        return {"buffers": buffers, "count": len(buffers), "estimated_memory_mb": sum(buffers.values()) / 2**20}

    def clear_buffer_pool(self) -> None:
        """Free the scratch buffers (those of every optimizer of the process: they share them); the next step
        allocates them again."""
        self._pool.clear()
        for pack in self.packs():
            pack.forget_views()

    def _per_tensor_table(self, *keys: str):
        names, columns = [], [[] for _ in keys]
        for pack in self.packs():
            if keys[0] not in pack.storage:
                continue
            names += [self.lora.name_of.get(id(p), f"param{i}") for i, p in enumerate(pack.params)]
            for column, key in zip(columns, keys):
                column += pack.storage[key].tolist()
        return (names, *columns)

    def stats(self) -> dict:
        out = super().stats()
        for pack in self.packs():
            if "adapt.importance" in pack.storage:
                break
        else:
            return out
        _, importance = self.per_tensor("adapt.importance")
        out["hina/importance/mean"] = importance.mean().item()
        out["hina/importance/min"] = importance.min().item()
        out["hina/importance/max"] = importance.max().item()
        return out
