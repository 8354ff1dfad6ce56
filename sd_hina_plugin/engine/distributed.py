"""Training engines that change the optimizer's parameters after it is built, in one place.

**DeepSpeed ZeRO-1/2** (and DeepSpeed's bf16 optimizer) flatten each param group's trainable parameters in order,
give rank ``r`` the elements ``[r * P, (r + 1) * P)`` of that flat buffer as one fp32 partition of ``P`` elements,
put the partition into the group in place of its parameters, and step one group at a time. Each model parameter
carries DeepSpeed's own map of where its elements went (``param._hp_mapping``). From it the partition is cut back
into tensors with the parameters' shapes, so shape-, name- and role-dependent techniques (CAME's factored moments,
SinkGD, per-tensor norms, LoRA pairs) see the tensors they would see in one process:

* a parameter wholly in this rank's partition, whose adapter module (its LoRA / LoKr / LoHa partners in the group)
  is too, is a **view** of its range of the partition;
* a parameter split between two ranks' partitions, or one whose adapter module lies on several ranks, is a
  **replica**: every rank that holds part of it keeps the whole tensor, its values and gradient are summed from the
  ranks' parts before the step (one ``all_reduce`` per group and step, over these few tensors only: at most a
  module or two at each partition boundary), each such rank computes the same update for all of it, and writes its
  own part back. Its state is kept, identically, on each of those ranks.

Per tensor, per row and column and per LoRA pair, the result is that of one process. So is C-Optim's context: its
sums over all tensors are completed across the ranks (a replica counted on one rank only, see
``Fragment.counted``), and, since DeepSpeed steps one group per ``step()`` call, its update runs once per
iteration, after the last group (:class:`Iteration`). The other statistics *across* tensors (AdaDecay's spread of
gradient sizes, AdamW_HinaAdaptive's importance) are over the tensors of this rank's partition in the group
stepping: a documented reduced form, said in one log line at the first step.

A layout other than the plain one (``round_robin_gradients``, ``parameter_alignment``) is refused at the first
step with an error saying so.

**ZeRO-3** partitions every parameter and steps sub-groups of a group one by one; it is refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Fragment:
    """What a member cut from a flat partition ``owner`` stands for: the model parameter ``source`` (number
    ``index`` of its group), held as a view of ``owner[start:start + numel]`` (``kind="view"``) or as a whole-tensor
    replica (``"replica"``)."""

    owner: torch.Tensor
    index: int
    source: torch.Tensor
    kind: str
    #: (start in the partition, start in the flattened source, numel) of each range of ``source`` this rank holds
    ranges: list[tuple[int, int, int]]
    engine: str = "DeepSpeed"
    #: whether this rank counts the tensor in sums over all tensors completed across ranks: a replica is held whole by
    #: several ranks and counts on the first of them only
    counted: bool = True
    #: replicas: the whole tensor (the member) and its gradient, filled by :meth:`Exchange.gather`
    value: torch.Tensor | None = None
    grad_value: torch.Tensor | None = None

    def member(self) -> torch.Tensor:
        if self.kind == "replica":
            return self.value
        start, _, numel = self.ranges[0]
        return self.owner.detach().view(-1).narrow(0, start, numel).view(tuple(self.source.shape))

    def grad(self) -> torch.Tensor | None:
        if self.kind == "replica":
            return self.grad_value
        g = self.owner.grad
        if g is None:
            return None
        start, _, numel = self.ranges[0]
        return g.view(-1).narrow(0, start, numel).view(tuple(self.source.shape))


@dataclass
class Exchange:
    """The replicas of one partition and the buffer their values and gradients are summed in across ranks."""

    owner: torch.Tensor
    #: (fragment or None where this rank holds none of it, offset in the buffer, numel) of every shared tensor
    shared: list[tuple[Fragment | None, int, int]] = field(default_factory=list)
    total: int = 0

    def gather(self) -> None:
        """Values and gradients of every replica: each rank puts in its own ranges, one all_reduce sums them."""
        grad = self.owner.grad
        buf = torch.zeros(2 * self.total, dtype=self.owner.dtype, device=self.owner.device)
        flat_owner = self.owner.detach().view(-1)
        for fragment, offset, numel in self.shared:
            for start, src, n in fragment.ranges if fragment is not None else ():
                buf[offset + src:offset + src + n].copy_(flat_owner[start:start + n])
                if grad is not None:
                    buf[self.total + offset + src:self.total + offset + src + n].copy_(grad.view(-1)[start:start + n])
        all_reduce_(buf)  # (through the GPU under NCCL, also when ZeRO-Offload keeps the partition on the CPU)
        for fragment, offset, numel in self.shared:
            if fragment is not None:
                fragment.value.view(-1).copy_(buf[offset:offset + numel])
                fragment.grad_value = None if grad is None else buf[self.total + offset:self.total + offset + numel].view(fragment.value.shape)

    def write_back(self) -> None:
        """Each rank's ranges of the replicas' new values into its partition."""
        flat_owner = self.owner.detach().view(-1)
        for fragment, _, _ in self.shared:
            if fragment is not None:
                value = fragment.value.detach().view(-1)
                for start, src, n in fragment.ranges:
                    flat_owner[start:start + n].copy_(value[src:src + n])


def _zero3_error(group_index: int) -> TypeError:
    return TypeError(
        f"param group {group_index} is partitioned by DeepSpeed ZeRO stage 3, which these optimizers do not support: "
        "it steps parts of a group one after another (so the group's step count, which drives phases and bias "
        "corrections, would count each part) and splits every tensor between ranks. Use ZeRO stage 1 or 2 "
        "(kohya: --zero_stage 2; per-tensor results equal one process), or FSDP2.")


def _world() -> tuple[int, int] | None:
    """(rank, world size) when a process group is initialised, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    world = _world()
    return 0 if world is None else world[0]


def partition(flat: torch.Tensor, origins: list[torch.Tensor], group_index: int,
              module_of: Callable[[torch.Tensor], str | None]) -> tuple[list[Fragment], Exchange | None] | None:
    """The fragments of ``flat`` (a partition DeepSpeed made of the group built with ``origins``), in partition order,
    and the exchange of its replicas; None when ``flat`` is no partition we know. ``module_of(parameter)`` names
    the adapter module of a parameter (None for others)."""
    if any(hasattr(p, "ds_id") for p in origins):
        raise _zero3_error(group_index)
    storage = flat.untyped_storage().data_ptr()
    local: dict[int, tuple[int, int, int]] = {}  # origin index -> (start in flat, start in origin, numel)
    for i, p in enumerate(origins):
        mapping = getattr(p, "_hp_mapping", None)
        hp = getattr(mapping, "hp_fragment", None)
        if hp is not None and hp.untyped_storage().data_ptr() == storage:
            local[i] = (hp.storage_offset() - flat.storage_offset(), mapping.lp_fragment_address.start, hp.numel())
    # DeepSpeed gives every parameter of the group the attribute, None where this rank holds none of it: a rank whose
    # partition is padding only still takes part in the group's exchange
    if not local and not any(hasattr(p, "_hp_mapping") for p in origins):
        return None
    holders = _holders(flat, origins, local)
    if holders is None:
        # (an error, not a fallback: another rank may have followed the layout and would wait for this one forever)
        raise TypeError(
            f"param group {group_index}: DeepSpeed's partition layout here is not the plain one (parameters in order, "
            f"partitions of {flat.numel()} elements): switch off zero_optimization's round_robin_gradients and "
            f"parameter_alignment settings, which these optimizers cannot follow")
    # shared: split between ranks, or in an adapter module (within the group) whose tensors lie on several ranks;
    # every rank holding part of any tensor of such a module keeps all of the module, so that pairs stay whole
    spread: dict[str, set[int]] = {}
    for i, p in enumerate(origins):
        key = module_of(p)
        if key is not None:
            spread.setdefault(key, set()).update(holders[i])
    participants = [spread[module_of(p)] if module_of(p) is not None else holders[i] for i, p in enumerate(origins)]
    shared = [i for i, p in enumerate(origins) if p.requires_grad and len(participants[i]) > 1]
    rank = torch.distributed.get_rank()
    exchange = Exchange(flat)
    fragments = []
    for i in shared:
        fragment = None
        if rank in participants[i]:
            # until the first gather: the model's copy (whole on every rank), this rank's range from the partition
            value = origins[i].detach().to(device=flat.device, dtype=flat.dtype, copy=True)
            ranges = [local[i]] if i in local else []
            for start, src, n in ranges:
                value.view(-1)[src:src + n].copy_(flat.detach().view(-1)[start:start + n])
            fragment = Fragment(flat, i, origins[i], "replica", ranges, value=value, counted=rank == min(participants[i]))
            fragments.append(fragment)
        exchange.shared.append((fragment, exchange.total, origins[i].numel()))
        exchange.total += origins[i].numel()
    fragments += [Fragment(flat, i, origins[i], "view", [r]) for i, r in local.items() if i not in set(shared)]
    fragments.sort(key=lambda f: (f.ranges[0][0] if f.ranges else flat.numel(), f.index))
    return fragments, exchange if exchange.shared else None


def _holders(flat: torch.Tensor, origins: list[torch.Tensor], local: dict[int, tuple[int, int, int]]) -> list[set[int]] | None:
    """The ranks holding part of each origin, from DeepSpeed's plain layout (the group's trainable parameters in
    order, partitions of ``flat.numel()`` elements); None unless every range DeepSpeed mapped here agrees with it."""
    world = _world()
    if world is None:
        return None
    rank, size = world
    psize = flat.numel()
    out: list[set[int]] = []
    offset = 0
    for i, p in enumerate(origins):
        if not p.requires_grad:
            out.append(set())
            continue
        n = p.numel()
        first, last = offset // psize, (offset + n - 1) // psize if n else offset // psize
        out.append(set(range(first, min(last, size - 1) + 1)) if n else set())
        if rank in out[-1] or i in local:
            start = max(offset, rank * psize)
            expected = (start - rank * psize, start - offset, min(offset + n, (rank + 1) * psize) - start)
            if local.get(i) != expected:
                return None
        offset += n
    return out if offset <= psize * size else None


def describe(fragments: list[Fragment]) -> str | None:
    """One line: how this rank trains the tensors of the engine's partitions (None without an engine)."""
    if not fragments:
        return None
    engine = fragments[0].engine
    views = sum(f.kind == "view" for f in fragments)
    replicas = len(fragments) - views
    return (f"{engine}: this rank trains {views} tensors as views of its partition and {replicas} whole copies of "
            f"tensors split between ranks or in a LoRA/LoKr module spread over ranks (shapes and names from "
            f"{engine}'s partition map: per-tensor, row/column and pair statistics and the C-Optim context as in one "
            f"process); statistics across tensors (AdaDecay, importance) are over this rank's tensors")


def all_reduce_(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group`` (default: all), in place: one all_reduce, through the GPU where the group
    communicates by NCCL alone and ``x`` is on the CPU (ZeRO-Offload's partitions, FSDP2's CPU offload)."""
    import torch.distributed as dist

    if x.device.type != "cuda" and dist.get_backend(group) == "nccl":
        reduced = x.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(reduced, group=group)
        return x.copy_(reduced)
    dist.all_reduce(x, group=group)
    return x


def mean_over_ranks(value: Any, device: torch.device) -> Any:
    """A value every rank has its own of (a closure's loss; a number is put on ``device``), averaged over all ranks
    when several processes run (one all_reduce: every rank calls ``step(closure)``), so that what follows from it
    stays the same on every rank; ``value`` itself in one process."""
    world = _world()
    if world is None or world[1] == 1:
        return value
    total = value.detach().to(dtype=torch.float32, copy=True).reshape(()) if isinstance(value, torch.Tensor) \
        else torch.tensor(float(value), device=device)
    return all_reduce_(total).div_(world[1])


class Iteration:
    """The param groups called since an iteration began. An engine that steps one group per ``step()`` call
    (DeepSpeed ZeRO sets ``param_groups`` to each of its groups in turn) spreads an iteration over several calls;
    what techniques do once all of an iteration's tensors have stepped (``Technique.finish``: the C-Optim context's
    update) then runs in the call that completes it, once every group the optimizer knows has been called (in one
    process, every call), or, should an engine leave a group out, before a group is called a second time. Which
    groups are called, in which order, is the same on every rank, so a collective in ``finish`` is met by all."""

    def __init__(self) -> None:
        self.called: dict[int, dict] = {}  # id(group) -> group

    def starts_again(self, groups: list[dict]) -> bool:
        """Whether a call of ``groups`` begins a new iteration while the last one is not finished."""
        return any(id(g) in self.called for g in groups)

    def record(self, groups: list[dict]) -> None:
        self.called.update((id(g), g) for g in groups)

    def complete(self, known: list[dict]) -> bool:
        return all(id(g) in self.called for g in known)

    def take(self) -> list[dict]:
        """The groups called in the iteration now finishing; the next one starts empty."""
        called = list(self.called.values())
        self.called.clear()
        return called
