"""Measuring what a step costs: dispatched ops, host syncs, state bytes.

:class:`OpCounter` is a ``TorchDispatchMode``: every ATen op that reaches the dispatcher while it is active is
counted once (a ``_foreach_*`` op over 400 tensors counts as one, which is the point). Host syncs are the
ops through which a device value reaches Python: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``,
``int(t)``), ``aten.is_nonzero`` (``bool(t)``, ``if t:``) and ``aten.item``. They are syncs on CUDA and
count the same on CPU, so the check runs anywhere.

Uploads are tensors made from host values (``torch.tensor([...])``, ``torch.as_tensor``, a Python number
assigned into a tensor): ``aten.lift_fresh``. On CUDA such a tensor reaches the device by a copy from
pageable host memory, which PyTorch follows with a stream synchronisation: the host waits for all queued
GPU work (``engine.pack.upload`` goes through pinned memory instead, which does not wait). A step makes them
only while it builds caches (its first update) and where some tensor has no gradient; counted on any device.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .engine.sharding import is_dtensor

SYNC_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item", "aten.equal")
UPLOAD_OPS = ("aten.lift_fresh", "aten.lift_fresh_copy")


class OpCounter(TorchDispatchMode):
    """Count ATen ops (by overload packet name) dispatched inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket).replace("aten::", "aten.")] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def syncs(self) -> int:
        return sum(n for name, n in self.ops.items() if name in SYNC_OPS)

    def sync_ops(self) -> dict[str, int]:
        return {name: n for name, n in self.ops.items() if name in SYNC_OPS}

    @property
    def uploads(self) -> int:
        return sum(n for name, n in self.ops.items() if name in UPLOAD_OPS)


def count_step(optimizer: torch.optim.Optimizer) -> OpCounter:
    """Run ``optimizer.step()`` once under an :class:`OpCounter` and return the counter."""
    with OpCounter() as counter:
        optimizer.step()
    return counter


def profiled_counts(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Host syncs and uploads of one ``optimizer.step()``, counted by ``torch.profiler`` instead of a dispatch mode:
    a compiled step (``compile=True``) runs eagerly under a ``TorchDispatchMode`` (dynamo compiles nothing there),
    so only the profiler sees what the compiled step itself does. Counts the ops of :data:`SYNC_OPS` and
    :data:`UPLOAD_OPS`.

    On CUDA the profiler cannot tell a device value read by the host (a sync) from a host value read by the host:
    a compiled step takes the lr and the step's numbers as 0-d CPU tensors, which inductor's wrapper may read with
    ``item()``. There, syncs are counted by CUDA's own sync debug mode (one warning per synchronizing call)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    cuda = any(p.device.type == "cuda" for g in optimizer.param_groups for p in g["params"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                optimizer.step()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(previous)
    names = [event.name.replace("aten::", "aten.") for event in prof.events()]
    syncs = (sum(1 for w in caught if "synchroniz" in str(w.message)) if cuda
             else sum(1 for n in names if n in SYNC_OPS))
    return {"syncs": syncs, "uploads": sum(1 for n in names if n in UPLOAD_OPS)}


def profiled_syncs(optimizer: torch.optim.Optimizer) -> int:
    """Host syncs of one ``optimizer.step()`` (see :func:`profiled_counts`)."""
    return profiled_counts(optimizer)["syncs"]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's state tensors, each distinct storage counted once (any optimizer; a DTensor's
    by this rank's local part, as torch's AdamW keeps its state under FSDP2)."""
    seen: dict[tuple[str, int], int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if is_dtensor(value):
                value = value.to_local()
            storage = value.untyped_storage()
            seen[(str(value.device), storage.data_ptr())] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    for state in optimizer.state.values():
        visit(state)
    return sum(seen.values())
