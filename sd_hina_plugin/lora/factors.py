"""Norms of factored weight updates without forming the dense product.

For a LoRA pair ``ΔW = B A`` (B: out x r, A: r x in; conv kernels viewed as matrices), with the QR
factorisation ``A^T = Q R`` (Q orthonormal, R at most r x r):

    ||(B A)_i,:|| = ||(B R^T)_i,:||            (B A = B R^T Q^T and Q^T preserves norms)
    ||X Y||_F     = ||R_X Y||_F  for  X = Q_X R_X

These are norms of small actual vectors, so nothing cancels. The equivalent Gram form b_i (A A^T) b_i^T
loses about sqrt(eps) * ||b_i|| ||A|| of absolute accuracy when a row of B A is small (3e-4 in fp32).

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


def batched_row_norms(b: torch.Tensor, a: torch.Tensor, buffers: dict | None = None) -> torch.Tensor:
    """Row norms of ``b[i] @ a[i]`` for batches ``b`` (k, out, r) and ``a`` (k, r, in): shape (k, out)."""
    r_t = torch.linalg.qr(a.transpose(1, 2), mode="r")[1].transpose(1, 2)  # (k, r, min(r, in))
    shape = (*b.shape[:2], r_t.shape[2])
    br = torch.bmm(b, r_t) if buffers is None else torch.bmm(b, r_t, out=_buffer(buffers, "br", shape, b))
    return torch.linalg.vector_norm(br, dim=-1)


def product_fro_norms(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """``||X @ Y||_F`` for each pair, as one tensor in input order."""
    out = torch.empty(len(xs), device=xs[0].device if xs else None)
    for _, idx in _by_shapes(xs, ys).items():
        x = as_matrices([xs[i] for i in idx])
        y = as_matrices([ys[i] for i in idx])
        r_x = torch.linalg.qr(x, mode="r")[1]  # X = Q R_X: ||X Y||_F = ||R_X Y||_F
        out[idx] = torch.linalg.vector_norm(torch.bmm(r_x, y), dim=(1, 2))
    return out
