"""Norms of factored weight updates without forming the dense product.

For a LoRA pair ``ΔW = B A`` (B: out x r, A: r x in; conv kernels viewed as matrices):

    ||(B A)_i,:|| = ||b_i L||     with L L^T = A A^T (the r x r Gram matrix of A, Cholesky-factored)
    ||X Y||_F^2   = sum((X^T X) ⊙ (Y Y^T))    (both r x r)

Row norms: the Gram matrix is formed in float64 (from the fp32 factors, so it is exact to ~1e-16), factored
by Cholesky in float64, and ``b_i L`` is evaluated in fp32. The norm of a vector computed with rounding
error e is off by at most ||e|| = O(eps32 ||b_i|| ||A||): the same order as what rounding the fp32 factors
themselves already costs. The direct quadratic form ``b_i (A A^T) b_i^T`` has no such guarantee: its terms
cancel when a row of B A nearly vanishes, and in fp32 it loses ``sqrt(eps32) ||b_i|| ||A|| = 3e-4 ||b_i|| ||A||``
(a small row came out as 0 or as noise). Only the r x r Gram matrix needs float64; the out x r product
runs in fp32, which is why this costs about a third of a float64 quadratic form on CPU. A rank-deficient A
makes the Gram matrix only semi-definite: it is factored with a jitter ``1e-13 tr(G)`` on the diagonal
(adding at most ``3.2e-7 ||b_i|| ||A||_F`` to a norm), and where even that fails (a matrix computed with
unusually large rounding) with ``1e-6 tr(G)``; the choice is made on device per module (no host sync).
A batched QR of A^T would avoid the jitter, but CUDA's QR runs one solver call per matrix for tall
matrices, so its kernel launches would grow with the number of modules. MPS has no float64: there the
quadratic form runs in fp32, with the loss above.

For a Kronecker product ``ΔW = w1 ⊗ w2``: ``||w1 ⊗ w2||_F = ||w1||_F ||w2||_F``.

``batched_row_norms`` works on a same-shape batch and ``product_fro_norms`` groups a list by shape, so the
number of ops depends on the number of distinct shapes, not on the number of modules.
"""

from __future__ import annotations

import math

import torch

from .names import Role


def as_matrices(tensors: list[torch.Tensor], buffers: dict | None = None, key: str = "",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stack same-shape tensors as a ``(k, rows, cols)`` batch of ``dtype`` (conv kernels flattened after dim 0).

    With ``buffers``, the stack is written into a buffer kept there under ``key`` and reused next time (one
    converting copy, no allocation: a fresh 20 MB float64 buffer per step cost more than the arithmetic)."""
    first = tensors[0]
    shape = (len(tensors), *first.shape)
    if buffers is not None:
        stacked = _buffer(buffers, key, shape, first, dtype)
        if first.dtype == dtype:
            torch.stack(tensors, out=stacked)
        else:
            views = buffers.get(key + ".views")
            if views is None or views[0] is not stacked:
                views = buffers[key + ".views"] = (stacked, stacked.unbind(0))
            torch._foreach_copy_(list(views[1]), tensors)
    else:
        stacked = torch.stack(tensors).to(dtype)
    # (the columns from the shape, not -1: a shard may hold no rows)
    return stacked.view(shape[0], shape[1] if len(shape) > 1 else 1, math.prod(shape[2:]))


def _buffer(buffers: dict, key: str, shape: tuple, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The buffer kept in ``buffers`` under ``key``, (re)allocated when its shape or dtype differs."""
    dtype = like.dtype if dtype is None else dtype
    out = buffers.get(key)
    if out is None or out.shape != shape or out.dtype != dtype:
        out = buffers[key] = torch.empty(shape, dtype=dtype, device=like.device)
    return out


def _by_shapes(*lists: list[torch.Tensor]) -> dict[tuple, list[int]]:
    classes: dict[tuple, list[int]] = {}
    for i, items in enumerate(zip(*lists)):
        classes.setdefault(tuple(tuple(t.shape) for t in items), []).append(i)
    return classes


def _exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision the Gram forms are evaluated in (float64; fp32 on MPS, which lacks float64)."""
    return t.to(exact_dtype(t.device))


def exact_dtype(device: torch.device) -> torch.dtype:
    """The dtype the Gram matrices are formed in: float64, or fp32 on MPS (which lacks float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def batched_row_norms(b: torch.Tensor, a: torch.Tensor, buffers: dict | None = None) -> torch.Tensor:
    """Row norms of ``b[i] @ a[i]`` for batches ``b`` (k, out, r) and ``a`` (k, r, in): shape (k, out), fp32.

    ``a`` may already be float64 (``as_matrices(..., dtype=torch.float64)`` stacks it so in one copy)."""
    if b.device.type == "mps":  # no float64: the quadratic form in fp32
        gram = torch.bmm(a.float(), a.float().transpose(1, 2))
        b = b.float()
        return torch.bmm(b, gram).mul_(b).sum(-1).clamp_min_(0).sqrt_()
    a = _exact(a)
    gram = torch.bmm(a, a.transpose(1, 2))  # (k, r, r), float64
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal(dim1=1, dim2=2).sum(-1).view(-1, 1, 1) * eye  # tr(G) I
    factor, info = torch.linalg.cholesky_ex(gram + scale * 1e-13 + eye * 1e-300)
    robust, _ = torch.linalg.cholesky_ex(gram + scale * 1e-6 + eye * 1e-300)
    factor = torch.where((info == 0).view(-1, 1, 1), factor, robust).to(torch.float32)
    b = b.float()
    bl = torch.bmm(b, factor) if buffers is None else torch.bmm(b, factor, out=_buffer(buffers, "bl", b.shape, b))
    return torch.linalg.vector_norm(bl, dim=-1)


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


#: the two sides of a Kronecker (LoKr) or Hadamard (LoHa) module: (full factor, its halves a, b, Tucker core)
SIDES = {
    "lokr": ((Role.LOKR_W1, Role.LOKR_W1_A, Role.LOKR_W1_B, Role.LOKR_T1),
             (Role.LOKR_W2, Role.LOKR_W2_A, Role.LOKR_W2_B, Role.LOKR_T2)),
    "loha": ((None, Role.HADA_W1_A, Role.HADA_W1_B, Role.HADA_T1),
             (None, Role.HADA_W2_A, Role.HADA_W2_B, Role.HADA_T2)),
}


def factor_norms(family: str, modules: list[dict[Role, torch.Tensor]]) -> torch.Tensor:
    """Per module: ``||w1|| * ||w2||`` (LoKr: the Kronecker product's norm; LoHa: a bound of the Hadamard's)."""
    first, second = (side_norms(modules, *side) for side in SIDES[family])
    return first * second


def side_norms(modules: list[dict[Role, torch.Tensor]], full: Role | None, a: Role, b: Role, core: Role) -> torch.Tensor:
    """Frobenius norm of one side per module: the full factor, the product of its halves, or, in LyCORIS'
    Tucker form (core ``t`` (r, r, k, k), ``a`` (r, out), ``b`` (r, in)), the contracted kernel.
    Call under ``torch.no_grad()``."""
    device = next(iter(modules[0].values())).device
    out = torch.empty(len(modules), device=device)
    full_idx = [i for i, m in enumerate(modules) if full is not None and full in m]
    tucker_idx = [i for i, m in enumerate(modules) if i not in full_idx and core in m]
    prod_idx = [i for i in range(len(modules)) if i not in full_idx and i not in tucker_idx]
    if full_idx:
        out[full_idx] = torch.stack(torch._foreach_norm([modules[i][full] for i in full_idx])).float()
    if prod_idx:
        out[prod_idx] = product_fro_norms([modules[i][a] for i in prod_idx], [modules[i][b] for i in prod_idx])
    for i in tucker_idx:  # rare (conv modules with use_tucker); small dense kernels
        m = modules[i]
        dense = torch.einsum("ijkl,ip,jr->prkl", m[core].float(), m[a].float(), m[b].float())
        out[i] = dense.norm()
    return out
