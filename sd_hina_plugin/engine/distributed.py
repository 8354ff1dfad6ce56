"""Training engines that change the optimizer's parameters after it is built, in one place.

**DeepSpeed ZeRO-1/2** (and DeepSpeed's bf16 optimizer) flatten each param group, give every rank one contiguous
fp32 partition of it, and put that partition into the group in place of its parameters. Each model parameter then
carries DeepSpeed's own map of where its elements went (``param._hp_mapping``: the range of the parameter the
rank holds and where in the partition it lies). From that map the partition is cut back into views with the
parameters' shapes, so shape-, name- and role-dependent techniques (CAME's factored moments, SinkGD, per-tensor
norms, LoRA pairs) see the tensors they would see in one process. A parameter that straddles two ranks' partitions
(at most two per group and rank) is trained as a 1-D tensor of its local part: its per-tensor, row and column
statistics are those of that part.

**ZeRO-3** partitions every parameter and steps sub-groups of a group one by one; it is refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Fragment:
    """A contiguous range of a flat partition ``owner`` standing for (part of) the model parameter ``source``."""

    owner: torch.Tensor
    start: int
    numel: int
    shape: tuple[int, ...]
    source: torch.Tensor
    #: whether the range is all of ``source`` (then ``shape`` is its shape), else a 1-D part of it
    whole: bool
    engine: str

    def view(self, owner: torch.Tensor) -> torch.Tensor:
        return owner.detach().view(-1).narrow(0, self.start, self.numel).view(self.shape)

    def grad(self) -> torch.Tensor | None:
        g = self.owner.grad
        return None if g is None else g.view(-1).narrow(0, self.start, self.numel).view(self.shape)


def _zero3_error(group_index: int) -> TypeError:
    return TypeError(
        f"param group {group_index} is partitioned by DeepSpeed ZeRO stage 3, which these optimizers do not support: "
        "it steps parts of a group one after another (so the group's step count, which drives phases and bias "
        "corrections, would count each part) and splits every tensor between ranks. Use ZeRO stage 1 or 2 "
        "(kohya: --zero_stage 2; per-element results equal one process), or FSDP2.")


def fragments_of(flat: torch.Tensor, origins: list[torch.Tensor], group_index: int) -> list[Fragment] | None:
    """The fragments of ``flat`` that DeepSpeed's partition map (``_hp_mapping`` of the group's original
    parameters ``origins``) places in it, in partition order; None when ``flat`` is no partition we know."""
    if any(hasattr(p, "ds_id") for p in origins):
        raise _zero3_error(group_index)
    storage = flat.untyped_storage().data_ptr()
    out: list[Fragment] = []
    for p in origins:
        mapping = getattr(p, "_hp_mapping", None)
        hp = getattr(mapping, "hp_fragment", None)
        if hp is None or hp.untyped_storage().data_ptr() != storage:
            continue
        numel = hp.numel()
        whole = mapping.lp_fragment_address.start == 0 and numel == p.numel()
        shape = tuple(p.shape) if whole else (numel,)
        out.append(Fragment(flat, hp.storage_offset() - flat.storage_offset(), numel, shape, p, whole, "DeepSpeed"))
    if not out:
        return None
    out.sort(key=lambda f: f.start)
    return out


def describe(fragments: list[Fragment]) -> str | None:
    """One line: how many tensors this rank trains whole and how many split, or None without an engine."""
    if not fragments:
        return None
    whole = sum(f.whole for f in fragments)
    split = len(fragments) - whole
    elements = sum(f.numel for f in fragments)
    engine = fragments[0].engine
    line = (f"{engine}: this rank trains {whole} tensors whole ({elements:,} elements in all, shapes and names recovered "
            f"from {engine}'s partition map, so per-tensor, row/column and LoRA-pair statistics are those of one process)")
    if split:
        line += (f" and {split} split between ranks, each trained as a 1-D tensor of its local part (per-tensor "
                 f"statistics of that part; per-element math unchanged)")
    return line + "; statistics across tensors (importance, C-Optim context, AdaDecay) are over this rank's tensors"

