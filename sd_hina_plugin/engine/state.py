"""``optimizer.state``: torch's mapping from parameter to its state dict, whose entries also answer the
upstream fork's read-only keys.

The upstream optimizers kept ``state[p]['lr_mask']`` (the per-element lr, in lr units) and
``state[p]['avg_lr']`` (its mean) as real state. Here the mask is stored once per pack as a multiplier of the
group's lr, so these two keys are computed when read: ``'lr_mask' in state`` is True exactly when the optimizer
has an lr mask for ``p``, and ``state['lr_mask']`` is a new fp32 tensor ``group lr * multiplier`` (no host sync:
``state['avg_lr']`` is a 0-d device tensor, which formats like a float). They never appear in ``keys()``,
``items()`` or ``state_dict()``, so checkpoints hold the real state only.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

#: keys computed on read, from ``optimizer.lr_in_lr_units(p)`` (present where ``optimizer._mask_technique(p)`` finds a mask)
DERIVED = ("lr_mask", "avg_lr")


class ParamState(dict):
    """``optimizer.state[p]``: a plain dict of state tensors, plus the derived keys of :data:`DERIVED`."""

    __slots__ = ("_owner", "_param")

    def __init__(self, owner: weakref.ref, param: torch.Tensor) -> None:
        super().__init__()
        self._owner = owner
        self._param = param

    def _derived(self, key: Any) -> torch.Tensor | None:
        if key not in DERIVED or dict.__contains__(self, key):
            return None
        owner = self._owner()
        lrs = owner.lr_in_lr_units(self._param) if owner is not None else None
        if lrs is None:
            return None
        return lrs if key == "lr_mask" else lrs.mean()

    def __contains__(self, key: object) -> bool:  # without computing the mask
        if dict.__contains__(self, key):
            return True
        owner = self._owner() if key in DERIVED else None
        return owner is not None and owner._mask_technique(self._param) is not None

    def __getitem__(self, key: Any) -> Any:
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        value = self._derived(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __reduce__(self):  # copied or pickled on its own: a plain dict of the real entries
        return (dict, (dict(self),))


class StateTable(dict):
    """``optimizer.state``: ``state[p]`` creates a :class:`ParamState` on first use, as torch's
    ``defaultdict(dict)`` creates a dict."""

    def __init__(self, owner: Any) -> None:
        super().__init__()
        self._owner = weakref.ref(owner)

    def __missing__(self, param: torch.Tensor) -> ParamState:
        owner = self._owner()
        member = owner._binding.member_for(param) if owner is not None else None
        if member is not None:  # a sharded parameter (FSDP2): the state of its local shard, which the packs train
            return self[member]
        entry = self[param] = ParamState(self._owner, param)
        return entry

    def __reduce__(self):
        return (dict, (dict(self),))
