"""Norms of factored weight updates without forming the dense product.

For a LoRA pair ``ΔW = B A`` (B: out x r, A: r x in; conv kernels viewed as matrices):

    ||(B A)_i,:||^2 = b_i (A A^T) b_i^T        (row i of ΔW, from B and the r x r Gram matrix of A)
    ||B A||_F^2    = sum((B^T B) ⊙ (A A^T))     (both r x r)

For a Kronecker product ``ΔW = w1 ⊗ w2``: ``||w1 ⊗ w2||_F = ||w1||_F ||w2||_F``.

``batched_row_norms`` works on a same-shape batch and ``product_fro_norms`` groups a list by shape, so the
number of ops depends on the number of distinct shapes, not on the number of modules.
"""

from __future__ import annotations

import torch


def as_matrices(tensors: list[torch.Tensor], buffers: dict | None = None, key: str = "") -> torch.Tensor:
    """Stack same-shape tensors as a ``(k, rows, cols)`` fp32 batch (conv kernels flattened after dim 0).

    With ``buffers``, the stack is written into a buffer kept there under ``key`` and reused next time."""
    first = tensors[0]
    shape = (len(tensors), *first.shape)
    if buffers is not None and first.dtype == torch.float32:
        out = buffers.get(key)
        if out is None or out.shape != shape:
            out = buffers[key] = torch.empty(shape, device=first.device)
        stacked = torch.stack(tensors, out=out)
    else:
        stacked = torch.stack(tensors).float()
    return stacked.view(shape[0], shape[1] if len(shape) > 1 else 1, -1)


def _by_shapes(*lists: list[torch.Tensor]) -> dict[tuple, list[int]]:
    classes: dict[tuple, list[int]] = {}
    for i, items in enumerate(zip(*lists)):
        classes.setdefault(tuple(tuple(t.shape) for t in items), []).append(i)
    return classes


def batched_row_norms(b: torch.Tensor, a: torch.Tensor, buffers: dict | None = None) -> torch.Tensor:
    """Row norms of ``b[i] @ a[i]`` for batches ``b`` (k, out, r) and ``a`` (k, r, in): shape (k, out)."""
    gram = torch.bmm(a, a.transpose(1, 2))
    if buffers is None:
        bg = torch.bmm(b, gram)
    else:
        bg = buffers.get("bg")
        if bg is None or bg.shape != b.shape:
            bg = buffers["bg"] = torch.empty_like(b)
        torch.bmm(b, gram, out=bg)
    return bg.mul_(b).sum(-1).clamp_min_(0).sqrt_()


def product_fro_norms(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """``||X @ Y||_F`` for each pair, as one tensor in input order."""
    out = torch.empty(len(xs), device=xs[0].device if xs else None)
    for _, idx in _by_shapes(xs, ys).items():
        x = as_matrices([xs[i] for i in idx])
        y = as_matrices([ys[i] for i in idx])
        gram_x = torch.bmm(x.transpose(1, 2), x)
        gram_y = torch.bmm(y, y.transpose(1, 2))
        out[idx] = (gram_x * gram_y).sum((1, 2)).clamp_min_(0).sqrt_()
    return out
