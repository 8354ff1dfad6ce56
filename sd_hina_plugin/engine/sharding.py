"""Sharded parameters (FSDP2's ``fully_shard``, DTensors), in one place.

FSDP2 replaces each parameter by a DTensor whose rows (dimension 0) are split between the ranks of a mesh:
rank ``r`` holds rows ``[r * c, min((r + 1) * c, n))`` with ``c = ceil(n / world)``, possibly none. Packs are
planned over the **local shards** (see ``engine/binding.py``), so elementwise work and state are per rank (state
memory divides by the number of ranks). What reduces over a tensor is reduced across the mesh through the
step context's primitives (``engine/context.py``): per-tensor sums, dot products and norms, column statistics
(a tensor viewed as a matrix ``(shape[0], prod(rest))``: its columns span the ranks, its rows do not), and
element counts are the whole tensor's. One ``all_reduce`` per primitive call and pack, never per tensor.

So that every rank's packs line up (the same tensors, in the same order, in the same packs, which is what lets
a per-tensor vector be summed across ranks), packs are planned from the **global** shapes: order, chunking,
8-bit choice and buckets come from them, and a rank whose shard of a tensor is empty keeps it with no elements.

Accepted: a 1-D mesh with ``Shard(0)`` (FSDP2's default) or ``Replicate()`` (a whole copy on every rank).
Other layouts (tensor parallel, ``Shard(1)``, HSDP's 2-D meshes) are refused with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import distributed
from .pack import upload

if TYPE_CHECKING:  # pragma: no cover
    from .pack import Pack

_MESHES: dict[int, "Mesh"] = {}


def is_dtensor(p: Any) -> bool:
    return type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor"


class Mesh:
    """The ranks a set of shards is split over: sums across them."""

    def __init__(self, group: Any, size: int, rank: int):
        self.group = group
        self.size = size
        self.rank = rank

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the mesh's ranks, in place (one ``all_reduce``)."""
        return distributed.all_reduce_(x, self.group)

    def sum_all_(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum each of ``parts`` over the ranks with one ``all_reduce`` (flattened into one buffer and back)."""
        if len(parts) == 1:
            return [self.sum_(parts[0])]
        flat = self.sum_(torch.cat([p.reshape(-1) for p in parts]))
        out, offset = [], 0
        for p in parts:
            out.append(flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return out


@dataclass
class Shard:
    """A member that is the local shard of DTensor ``param``: rows ``[offset, offset + rows)`` of ``shape``."""

    param: torch.Tensor
    mesh: Mesh | None
    shape: tuple[int, ...]
    offset: int
    rows: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _mesh(device_mesh: Any) -> Mesh:
    group = device_mesh.get_group()
    mesh = _MESHES.get(id(group))
    if mesh is None:
        import torch.distributed as dist

        mesh = _MESHES[id(group)] = Mesh(group, dist.get_world_size(group), dist.get_rank(group))
    return mesh


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    return p._local_tensor if hasattr(p, "_local_tensor") else p.data._local_tensor


def shard_of(p: torch.Tensor, where: str) -> Shard:
    """What DTensor ``p`` holds on this rank, or a clear error for layouts these optimizers cannot follow."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard as ShardPlacement

    mesh, placements = p.device_mesh, p.placements
    plain = len(placements) == 1 and (type(placements[0]) is Replicate
                                      or (type(placements[0]) is ShardPlacement and placements[0].dim == 0))
    if mesh.ndim != 1 or not plain:
        raise TypeError(
            f"{where} is a DTensor laid out as {tuple(placements)} on a {mesh.ndim}-D mesh. These optimizers follow "
            f"FSDP2's layout (Shard(0) on one mesh dimension) and whole copies (Replicate()); tensor parallel, "
            f"Shard(d > 0) and HSDP (2-D meshes) are not supported.")
    local = local_tensor(p)
    shape = tuple(p.shape)
    if type(placements[0]) is Replicate:
        return Shard(p, None, shape, 0, shape[0] if shape else 1)
    m = _mesh(mesh)
    n = shape[0]
    chunk = -(-n // m.size) if n else 0
    offset = min(m.rank * chunk, n)
    rows = local.shape[0]
    if rows != max(0, min(chunk, n - offset)):
        raise TypeError(f"{where}: its local shard has {rows} rows where FSDP2's layout gives rank {m.rank} "
                        f"{max(0, min(chunk, n - offset))} of {n}; this layout is not supported")
    return Shard(p, m, shape, offset, rows)


def local_grad(shard: Shard) -> torch.Tensor | None:
    g = shard.param.grad
    if g is None:
        return None
    return local_tensor(g) if is_dtensor(g) else g


def wrap_state(shard: Shard, value: torch.Tensor, kind: str) -> torch.Tensor:
    """A state tensor of ``shard``'s parameter as a DTensor for ``torch.distributed.checkpoint``: per element
    (laid out like the parameter) and per row: sharded like it; per tensor and per column (the same on every
    rank): replicated. Kinds laid out per rank (8-bit block scales, packed bits) cannot be resharded: they are
    sharded as ``(ranks, largest local size)``, which loads back on the same number of ranks only."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor import Shard as ShardPlacement

    mesh = shard.param.device_mesh
    if shard.mesh is None or kind in ("tensor", "cols"):
        return DTensor.from_local(value, mesh, [Replicate()], run_check=False)
    if kind == "elem":
        return DTensor.from_local(value, mesh, [ShardPlacement(0)], run_check=False,
                                  shape=torch.Size(shard.shape), stride=_contiguous_stride(shard.shape))
    if kind == "rows":
        n = shard.shape[0] if shard.shape else 1
        return DTensor.from_local(value, mesh, [ShardPlacement(0)], run_check=False, shape=torch.Size((n,)), stride=(1,))
    # per rank (8-bit block scales, packed bits): padded to the largest rank's size (rank 0's, which holds the most
    # rows), so that the layout is an even Shard(0) of (ranks, width)
    from ..numerics.quant8 import BLOCK, padded

    n = shard.shape[0] if shard.shape else 1
    most = min(-(-n // shard.mesh.size), n) * (math.prod(shard.shape[1:]) if len(shard.shape) > 1 else 1)
    return per_rank(shard, value, padded(most) // (BLOCK if kind == "blocks" else 8))


def per_rank(shard: Shard, value: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """``value``, which differs from rank to rank (a random generator's state, 8-bit block scales), as a DTensor
    ``(ranks, width)`` sharded by rank: each rank's row is its value, zero-padded to ``width`` (default: its size)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard as ShardPlacement

    width = value.numel() if width is None else width
    holder = torch.zeros((1, width), dtype=value.dtype, device=value.device)
    holder[0, :value.numel()] = value.reshape(-1)
    return DTensor.from_local(holder, shard.param.device_mesh, [ShardPlacement(0)], run_check=False,
                              shape=torch.Size((shard.mesh.size, width)), stride=(width, 1))


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, out = 1, []
    for n in reversed(shape):
        out.append(stride)
        stride *= max(n, 1)
    return tuple(reversed(out))


def unwrap_state(value: Any, target: torch.Tensor, kind: str, where: str) -> Any:
    """A loaded state value for ``target`` (this rank's local state): DTensors as their local part; per-rank
    kinds cut back from their padding. A plain tensor is taken as it is (state saved by one process does not load on
    several ranks)."""
    if not isinstance(value, torch.Tensor):
        return value
    if is_dtensor(value):
        local = value.to_local()
        if kind in ("elem", "rows", "tensor", "cols"):
            return local
        if local.dim() != 2 or local.shape[0] != 1 or local.shape[1] < target.numel():
            raise ValueError(f"{where}: state laid out per rank (8-bit block scales or packed bits) was saved with "
                             f"another number of ranks; it loads back on the same number of ranks only")
        return local[0, :target.numel()].view(target.shape)
    return value


def whole(members: list[torch.Tensor], shards: list[Shard | None]) -> list[torch.Tensor]:
    """The whole tensors ``members`` are local shards of (members held whole: themselves), with one collective for
    all of them: each rank puts its rows into a zeroed buffer of the whole tensors, a sum across the mesh completes
    it. For the small factors of adapter modules (LoRA's A, LoKr/LoHa halves), never for a model's weights."""
    mesh = next((s.mesh for s in shards if s is not None and s.mesh is not None), None)
    if mesh is None:
        return list(members)
    classes: dict[tuple, list[int]] = {}
    for i, (m, s) in enumerate(zip(members, shards)):
        classes.setdefault((tuple(s.shape) if s is not None else tuple(m.shape), s is not None and s.mesh is not None), []).append(i)
    parts, where = [], []
    dtype = torch.float64 if any(m.dtype == torch.float64 for m in members) else torch.float32  # (one buffer for all)
    for (shape, sharded), index in classes.items():
        stacked = torch.zeros((len(index), *shape), dtype=dtype, device=members[index[0]].device)
        if sharded:  # same shape, same chunking: the same rows on this rank for every tensor of the class
            s = shards[index[0]]
            stacked[:, s.offset:s.offset + s.rows] = torch.stack([members[i] for i in index])
        elif mesh.rank == 0:  # held whole on every rank: counted once
            stacked.copy_(torch.stack([members[i] for i in index]))
        parts.append(stacked)
        where.append(index)
    out: list[torch.Tensor] = [None] * len(members)  # type: ignore[list-item]
    for stacked, index in zip(mesh.sum_all_(parts), where):
        for i, t in zip(index, stacked.unbind(0)):
            out[i] = t.to(members[i].dtype)
    return out


def complete_rows(values: torch.Tensor, shards: list[Shard | None]) -> torch.Tensor:
    """Per-row values ``(k, local rows)`` of same-shape shards as ``(k, rows)`` of the whole tensors (one collective)."""
    s = shards[0]
    if s is None or s.mesh is None:
        return values
    full = torch.zeros((values.shape[0], s.shape[0] if s.shape else 1), dtype=values.dtype, device=values.device)
    full[:, s.offset:s.offset + s.rows] = values
    return s.mesh.sum_(full)


def sum_rows_(values: torch.Tensor, shards: list[Shard | None]) -> torch.Tensor:
    """Sums over the rows of same-shape shards (``(k, ...)``, this rank's rows) completed over all their rows."""
    s = shards[0]
    return values if s is None or s.mesh is None else s.mesh.sum_(values)


class ShardAccess:
    """Mixed into :class:`~sd_hina_plugin.engine.base.HinaOptimizer`: what techniques that work outside a pack's
    step context (on adapter modules, or on every tensor of a group) use instead of knowing about shards."""

    # -- whole tensors of sharded members (engine/sharding.py), for techniques working on adapter modules ------
    def full_shape(self, member: torch.Tensor) -> tuple[int, ...]:
        """The shape of the whole tensor ``member`` stands for (its own, unless it is a shard)."""
        shard = self._binding.shard(member)
        return tuple(member.shape) if shard is None else shard.shape

    def layout_of(self, member: torch.Tensor) -> tuple:
        """What tensors must share to be stacked and reduced together: the whole tensor's shape and the ranks it is
        sharded over (None: held whole)."""
        shard = self._binding.shard(member)
        return (self.full_shape(member), None if shard is None or shard.mesh is None else id(shard.mesh))

    def whole(self, members: list[torch.Tensor]) -> list[torch.Tensor]:
        """The whole tensors of ``members`` (themselves unless sharded; see :func:`whole`)."""
        return whole(members, [self._binding.shard(m) for m in members])

    def complete_rows(self, members: list[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
        """Per-row values ``(k, rows here)`` of same-shape ``members`` as ``(k, rows)`` of the whole tensors."""
        return complete_rows(values, [self._binding.shard(m) for m in members])

    def sum_rows_(self, members: list[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
        """Sums over the rows of same-shape ``members`` (``(k, ...)``) completed over all rows of the whole tensors."""
        return sum_rows_(values, [self._binding.shard(m) for m in members])

    def counted_weights(self, pack: Pack) -> torch.Tensor | None:
        """Per tensor of ``pack``: 1 where this rank counts it in sums over all tensors completed across ranks, 0 where
        another rank does (a DeepSpeed replica, see ``Fragment.counted``); None when it counts all of them."""
        def make() -> torch.Tensor | bool:
            counted = [self._binding.counted(p) for p in pack.params]
            return False if all(counted) else upload([float(c) for c in counted], pack.device)  # (first step only)

        weights = pack.derive("counted", make)
        return None if weights is False else weights

    def add_step_sum(self, key: str, pack: Pack, values: torch.Tensor) -> None:
        """Add ``values`` (sums over the elements of ``pack``, see ``StepContext.total_dots``) to this iteration's
        sums under ``key``."""
        by_mesh = self.iteration_sums.setdefault(key, {})
        entry = by_mesh.get(id(pack.mesh))
        by_mesh[id(pack.mesh)] = (pack, values if entry is None else entry[1] + values.to(entry[1].device))

    def step_sum(self, key: str) -> torch.Tensor | None:
        """This iteration's sums under ``key`` (see :meth:`add_step_sum`) over every tensor's elements, completed across
        the ranks for sharded packs (one collective per mesh) and for an engine's partitions (one collective); None
        if nothing was added. Clears them. (Every rank that trains tensors adds to them in the same iterations: whether
        a technique runs follows the groups' step counts, the same on all of them. A rank whose partitions are padding
        only, in every group, would not take part: DeepSpeed on more ranks than such a model has elements to split.)"""
        by_mesh = self.iteration_sums.pop(key, None)
        total = None
        for pack, values in (by_mesh or {}).values():
            values = pack.sum_(values)
            total = values if total is None else total + values.to(total.device)
        if total is not None and self._binding.partitioned:
            total = distributed.all_reduce_(total)
        return total

    @staticmethod
    def sum_across_ranks_(packs: list[Pack], vector: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """A per-tensor vector laid out as :meth:`per_tensor` concatenates it (or, given ``index``, its entries at
        ``index`` only), made of this rank's parts of sharded tensors (see engine/sharding.py): summed across the
        ranks where its packs are sharded (one collective when every pack is sharded over the same ranks, as under
        FSDP2). In place where it can be; use the result."""
        meshes = {id(pack.mesh) for pack in packs}
        if meshes == {id(None)}:
            return vector
        if index is not None:
            whole = torch.zeros(sum(len(pack.params) for pack in packs), dtype=vector.dtype, device=vector.device)
            return ShardAccess.sum_across_ranks_(packs, whole.index_copy_(0, index, vector))[index]
        if len(meshes) == 1:
            return packs[0].sum_(vector)
        offset = 0
        for pack in packs:
            pack.sum_(vector[offset:offset + len(pack.params)])
            offset += len(pack.params)
        return vector

