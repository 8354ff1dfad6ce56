"""Norms of factored weight updates without forming the dense product.

For a LoRA pair ``ΔW = B A`` (B: out x r, A: r x in; conv kernels viewed as matrices):

    ||(B A)_i,:||^2 = b_i (A A^T) b_i^T        (row i of ΔW, from B and the r x r Gram matrix of A)
    ||X Y||_F^2     = sum((X^T X) ⊙ (Y Y^T))    (both r x r)

Both are evaluated in float64. In fp32 the Gram form loses about sqrt(eps32) * ||b_i|| ||A|| = 3e-4 ||b_i|| ||A||
of absolute accuracy, so a small row of B A came out as 0 or as noise; in float64 the loss is about
1.5e-8 ||b_i|| ||A||, below what rounding the fp32 factors themselves already costs (6e-8 ||b_i|| ||A||). A batched QR of A^T would be as
accurate in fp32, but CUDA's QR runs one solver call per matrix for tall matrices, so its kernel launches
would grow with the number of modules; the float64 Gram form stays a few batched matmuls. MPS has no
float64: there the form runs in fp32, with the loss above.

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
        stacked = torch.stack(tensors, out=_buffer(buffers, key, shape, first))
    else:
        stacked = torch.stack(tensors).float()
    return stacked.view(shape[0], shape[1] if len(shape) > 1 else 1, -1)


def _buffer(buffers: dict, key: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """The buffer kept in ``buffers`` under ``key``, (re)allocated when its shape differs."""
    out = buffers.get(key)
    if out is None or out.shape != shape:
        out = buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return out


def _by_shapes(*lists: list[torch.Tensor]) -> dict[tuple, list[int]]:
    classes: dict[tuple, list[int]] = {}
    for i, items in enumerate(zip(*lists)):
        classes.setdefault(tuple(tuple(t.shape) for t in items), []).append(i)
    return classes


def _exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision the Gram forms are evaluated in (float64; fp32 on MPS, which lacks float64)."""
    return t if t.device.type == "mps" else t.double()


def batched_row_norms(b: torch.Tensor, a: torch.Tensor, buffers: dict | None = None) -> torch.Tensor:
    """Row norms of ``b[i] @ a[i]`` for batches ``b`` (k, out, r) and ``a`` (k, r, in): shape (k, out), fp32."""
    a, b = _exact(a), _exact(b)
    gram = torch.bmm(a, a.transpose(1, 2))
    bg = torch.bmm(b, gram) if buffers is None else torch.bmm(b, gram, out=_buffer(buffers, "bg", b.shape, b))
    return bg.mul_(b).sum(-1).clamp_min_(0).sqrt_().float()


def product_fro_norms(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """``||X @ Y||_F`` for each pair, as one tensor in input order."""
    out = torch.empty(len(xs), device=xs[0].device if xs else None)
    for _, idx in _by_shapes(xs, ys).items():
        x = as_matrices([xs[i] for i in idx])
        y = as_matrices([ys[i] for i in idx])
        x, y = _exact(x), _exact(y)
        gram_x = torch.bmm(x.transpose(1, 2), x)
        gram_y = torch.bmm(y, y.transpose(1, 2))
        out[idx] = (gram_x * gram_y).sum((1, 2)).clamp_min_(0).sqrt_().float()
    return out
