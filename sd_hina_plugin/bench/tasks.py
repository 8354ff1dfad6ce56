"""Benchmark tasks that need no download and run on a 2-core CPU in seconds to minutes.

Each task builds a :class:`Problem`: named trainable parameters (adapter names as kohya / LyCORIS write them,
so role-aware optimizers do their real work), a training loss for step i, and a deterministic held-out loss.
The adaptation tasks first pretrain their base model with AdamW (cached per seed) and then adapt only the
adapter to a shifted data distribution, as a LoRA/LoKr fine-tune does. ``encoder-lora`` (``encoder.py``) pretrains
the largest base model, once per process, and fine-tunes it as PEFT does for text classification.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .encoder import encoder_lora
from .problem import VOCAB, Problem, encode, printable


# -- images for the diffusion task ---------------------------------------------------------------------------

def shapes(n: int, gen: torch.Generator, kind: str, size: int = 16) -> torch.Tensor:
    """Procedural 1-channel images in [-1, 1]: filled squares and discs ("base"), or striped rings ("shifted")."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = torch.full((n, 1, size, size), -1.0)
    for i in range(n):
        cx, cy = (torch.rand(2, generator=gen) * (size - 6) + 3).tolist()
        radius = 2.5 + torch.rand(1, generator=gen).item() * 3
        level = 0.2 + 0.8 * torch.rand(1, generator=gen).item()
        dist = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()
        if kind == "base":
            square = torch.rand(1, generator=gen).item() < 0.5
            mask = ((xx - cx).abs() <= radius) & ((yy - cy).abs() <= radius) if square else dist <= radius
            out[i, 0][mask] = level
        else:
            mask = (dist <= radius + 1.5) & (dist >= radius - 1.0)
            stripes = ((xx + yy).long() % 3 == 0).float() * 0.6 - 0.3
            out[i, 0][mask] = level
            out[i, 0] += stripes * mask
    return out.clamp_(-1, 1)


class LoRAConv(nn.Module):
    """A frozen conv with a kohya-style LoRA branch (lora_down kernel like the base, lora_up 1x1, zero init)."""

    def __init__(self, base: nn.Conv2d, rank: int):
        super().__init__()
        self.base = base
        self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x))


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x))


class TinyUNet(nn.Module):
    """A two-level conv U-Net with a sinusoidal timestep embedding (about 40 k parameters)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.time = nn.Linear(16, width)
        self.conv_in = nn.Conv2d(1, width, 3, padding=1)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.up = nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)
        self.conv_out = nn.Conv2d(2 * width, 1, 3, padding=1)

    def forward(self, x, t):
        dtype = next(self.parameters()).dtype
        x = x.to(dtype)
        freqs = torch.exp(torch.arange(8, device=x.device) * (-math.log(1000.0) / 8))
        emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1).to(dtype)
        h = F.silu(self.conv_in(x) + self.time(emb)[:, :, None, None])
        d = F.silu(self.down(h))
        d = F.silu(self.mid(d))
        u = F.silu(self.up(d))
        return self.conv_out(torch.cat([h, u], 1))


_CACHE: dict[tuple, dict] = {}
STEPS_T = 100
_BETAS = torch.linspace(1e-4, 0.05, STEPS_T)
_ALPHA_BAR = torch.cumprod(1 - _BETAS, 0)


def _eps_loss(model, x0, gen):
    t = torch.randint(0, STEPS_T, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    ab = _ALPHA_BAR[t].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    return F.mse_loss(model(xt, t.float()).float(), noise)


def _pretrained_frozen(key: tuple, make: Callable[[], nn.Module], seed: int, lr: float, steps: int,
                       prepare: Callable[[torch.Generator], Callable[[nn.Module, int], torch.Tensor]]) -> nn.Module:
    """A frozen copy of ``make()`` pretrained with AdamW for ``steps`` steps (weights cached per key).

    ``prepare(gen)`` builds the pretraining data from the seeded generator and returns the batch loss."""
    if key not in _CACHE:
        torch.manual_seed(seed)
        base = make()
        gen = torch.Generator().manual_seed(seed)
        batch_loss = prepare(gen)
        opt = torch.optim.AdamW(base.parameters(), lr=lr)
        for i in range(steps):
            opt.zero_grad()
            batch_loss(base, i).backward()
            opt.step()
        _CACHE[key] = base.state_dict()
    torch.manual_seed(seed + 1)
    model = make()
    model.load_state_dict(_CACHE[key])
    return model.requires_grad_(False)


def unet_lora(seed: int, pretrain_steps: int = 150, batch: int = 32) -> Problem:
    """LoRA (rank 4, conv and linear) on a small diffusion U-Net pretrained here on squares and discs, adapted
    to striped rings with the epsilon-prediction loss."""
    def prepare(gen):
        data = shapes(512, gen, "base")
        return lambda m, i: _eps_loss(m, data[(i * batch) % 512:][:batch], gen)

    model = _pretrained_frozen(("unet", seed, pretrain_steps), TinyUNet, seed, 2e-3, pretrain_steps, prepare)
    for name in ("conv_in", "down", "mid", "conv_out"):
        setattr(model, name, LoRAConv(getattr(model, name), 4))
    model.time = LoRALinear(model.time, 4)
    named = [(f"lora_unet_{n}", p) for n, p in model.named_parameters() if p.requires_grad]  # lora_unet_mid.lora_up.weight
    gen = torch.Generator().manual_seed(seed + 2)
    train = shapes(256, gen, "shifted")
    test = shapes(64, torch.Generator().manual_seed(10_000 + seed), "shifted")
    test_gen_seed = 20_000 + seed

    def loss(i: int) -> torch.Tensor:
        return _eps_loss(model, train[(i * batch) % 256:][:batch], gen)

    def heldout() -> float:
        with torch.no_grad():
            return _eps_loss(model, test, torch.Generator().manual_seed(test_gen_seed)).item()

    return Problem(named, loss, heldout, (model,))


# -- text for the language-model task ------------------------------------------------------------------------

def corpus(kind: str) -> str:
    """Offline text: docstrings of the Python standard library (every Python install has them)."""
    import collections
    import json
    import pathlib
    import string
    import textwrap
    import typing

    modules = (collections, json, pathlib) if kind == "base" else (string, textwrap, typing)
    parts = []
    for module in modules:
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(doc)
    return printable("\n".join(parts))


class LoKrLinear(nn.Module):
    """A frozen Linear with a LyCORIS-style LoKr branch: delta W = kron(w1, w2_a @ w2_b), w2_b zero-initialised."""

    def __init__(self, base: nn.Linear, factor: int = 8, rank: int = 4):
        super().__init__()
        self.base = base
        out_f, in_f = base.out_features, base.in_features
        self.lokr_w1 = nn.Parameter(torch.randn(factor, factor) * 0.1)
        self.lokr_w2_a = nn.Parameter(torch.randn(out_f // factor, rank) * 0.1)
        self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_f // factor))

    def forward(self, x):
        delta = torch.kron(self.lokr_w1, self.lokr_w2_a @ self.lokr_w2_b)
        return self.base(x) + F.linear(x, delta)


class TinyLM(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, context: int = 32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(d, 4, 2 * d, 0.0, batch_first=True) for _ in range(layers)])
        self.head = nn.Linear(d, VOCAB)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx):
        h = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            h = block(h, src_mask=self.causal[: idx.shape[1], : idx.shape[1]], is_causal=True)
        return self.head(h)


def _lm_loss(model, tokens, starts, context=32):
    idx = torch.stack([tokens[s:s + context + 1] for s in starts.tolist()])
    logits = model(idx[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))


def lm_lokr(seed: int, pretrain_steps: int = 150, batch: int = 32) -> Problem:
    """LoKr on the feed-forward layers of a small causal transformer pretrained here on one set of stdlib
    docstrings, adapted to another set (character-level cross-entropy)."""
    base_tokens, new_tokens = encode(corpus("base")), encode(corpus("shifted"))
    model = _pretrained_frozen(
        ("lm", seed, pretrain_steps), TinyLM, seed, 3e-3, pretrain_steps,
        lambda gen: lambda m, i: _lm_loss(m, base_tokens, torch.randint(0, len(base_tokens) - 40, (batch,), generator=gen)))
    for block in model.blocks:
        block.linear1 = LoKrLinear(block.linear1)
        block.linear2 = LoKrLinear(block.linear2)
    named = [(f"lora_te_{n.rsplit('.', 1)[0].replace('.', '_')}.{n.rsplit('.', 1)[1]}", p)  # lora_te_blocks_0_linear1.lokr_w1
             for n, p in model.named_parameters() if p.requires_grad]
    split = int(len(new_tokens) * 0.8)
    train_tokens, test_tokens = new_tokens[:split], new_tokens[split:]
    gen = torch.Generator().manual_seed(seed + 2)
    test_starts = torch.randint(0, len(test_tokens) - 40, (128,), generator=torch.Generator().manual_seed(30_000 + seed))

    def loss(i: int) -> torch.Tensor:
        return _lm_loss(model, train_tokens, torch.randint(0, len(train_tokens) - 40, (batch,), generator=gen))

    def heldout() -> float:
        with torch.no_grad():
            return _lm_loss(model, test_tokens, test_starts).item()

    return Problem(named, loss, heldout, (model,))


# -- classic problems ----------------------------------------------------------------------------------------

def rosenbrock(seed: int) -> Problem:
    """f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from (-1.5, 2) (plus a small seed-dependent offset)."""
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.tensor([-1.5, 2.0]) + 0.05 * torch.randn(2, generator=gen))

    def value() -> torch.Tensor:
        x = p.float()
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    return Problem([("x", p)], lambda i: value(), lambda: value().item())


def quadratic(seed: int, dim: int = 64, condition: float = 1e3) -> Problem:
    """0.5 x^T H x with eigenvalues log-spaced over [1/condition, 1] in a random basis, noisy gradients."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    h = q @ torch.diag(torch.logspace(-math.log10(condition), 0, dim)) @ q.T
    p = nn.Parameter(torch.randn(dim, generator=gen))
    noise = torch.Generator().manual_seed(seed + 1)

    def loss(i: int) -> torch.Tensor:
        x = p.float()
        return 0.5 * x @ h @ x + 1e-3 * (torch.randn(dim, generator=noise) @ x)

    return Problem([("x", p)], loss, lambda: (0.5 * p.float() @ h @ p.float()).item())


#: name -> (builder, Adam-scale base lr of the sweep, description)
TASKS: dict[str, tuple[Callable[..., Problem], float, str]] = {
    "unet-lora": (unet_lora, 3e-3, "LoRA r4 on a small diffusion U-Net, adapted to a shifted image set (epsilon MSE)"),
    "lm-lokr": (lm_lokr, 3e-3, "LoKr on a small causal transformer, adapted to a shifted text (char cross-entropy)"),
    "encoder-lora": (encoder_lora, 3e-3, "PEFT-style LoRA r8 (query, value) + a new classifier head on a transformer pretrained "
                     "here (0.82 M params): which module a docstring snippet is from (cross-entropy)"),
    "rosenbrock": (rosenbrock, 3e-2, "Rosenbrock function from (-1.5, 2)"),
    "quadratic": (quadratic, 3e-2, "ill-conditioned quadratic (condition 1e3, 64-D, noisy gradients)"),
}
