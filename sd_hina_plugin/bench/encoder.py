"""The ``encoder-lora`` task: LoRA on a pretrained transformer, fine-tuned as a text classifier the way PEFT does it.

No model hub is needed: the base model is pretrained here. It is a character-level pre-norm transformer (width 128,
4 layers, 4 heads, about 0.82 M parameters; BERT's module names ``query`` / ``key`` / ``value`` / ``dense`` /
``intermediate`` / ``output``), trained as a causal language model with plain AdamW (300 steps of 32 x 48
characters, lr 3e-3 with a linear warm-up and cosine decay) on the docstrings of 34 standard-library modules. This
happens once per process (about half a minute on one CPU thread) and does not depend on the benchmark seed, as a
downloaded checkpoint would not.

The fine-tune freezes it, puts LoRA (rank 8, alpha 16) on the query and value projections of every layer (PEFT's
default targets for BERT-like models) and trains a new classifier head on the mean of the last hidden states with
it (PEFT's ``modules_to_save``). The task: tell which of four other modules (logging, difflib, ipaddress, statistics) a
48-character docstring snippet comes from. The held-out snippets come from docstrings never trained on (every fifth
docstring of each module). The trainable parameters carry PEFT's names
(``base_model.model.encoder.layers.0.attention.query.lora_A.default.weight``,
``base_model.model.classifier.modules_to_save.default.weight``); the tests check them, and the forward pass,
against ``peft`` itself.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import math

import torch
from torch import nn
from torch.nn import functional as F

from .problem import VOCAB, Problem, encode, printable

PRETRAIN_MODULES = ("typing", "email.policy", "doctest", "inspect", "unittest.mock", "threading", "ssl",
                    "xml.etree.ElementTree", "http.cookiejar", "configparser", "email.message", "smtplib", "tarfile",
                    "unittest.case", "shutil", "optparse", "urllib.request", "random", "http.server", "subprocess",
                    "urllib.parse", "codecs", "socketserver", "re", "traceback", "asyncio.events", "importlib.metadata",
                    "enum", "zipfile", "pathlib", "collections", "functools", "contextlib", "itertools")
CLASS_MODULES = ("logging", "difflib", "ipaddress", "statistics")
PEFT_PREFIX = "base_model.model."


def docstrings(module_name: str) -> list[str]:
    """The docstrings a module defines itself: its own, those of its functions and classes, and those of its
    classes' methods and properties. Members imported from elsewhere are left out, so no two modules share text."""
    module = importlib.import_module(module_name)
    found = [module.__doc__]
    for _, obj in inspect.getmembers(module):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        found.append(obj.__doc__)
        if inspect.isclass(obj):
            found += [member.__doc__ for key, member in vars(obj).items() if not key.startswith("__")
                      and (inspect.isfunction(member) or isinstance(member, (staticmethod, classmethod, property)))]
    return [printable(inspect.cleandoc(doc)) for doc in found if isinstance(doc, str) and doc.strip()]


@functools.lru_cache(maxsize=None)
def _pretraining_text() -> torch.Tensor:
    return encode("\n".join(doc for name in PRETRAIN_MODULES for doc in docstrings(name)))


@functools.lru_cache(maxsize=None)
def _class_texts() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per class, (training text, held-out text): every fifth docstring of a module is held out."""
    train, test = [], []
    for name in CLASS_MODULES:
        docs = docstrings(name)
        train.append(encode("\n".join(d for i, d in enumerate(docs) if i % 5 != 4)))
        test.append(encode("\n".join(d for i, d in enumerate(docs) if i % 5 == 4)))
    return train, test


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.dense = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        b, n, w = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, w // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(y.transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.attention = nn.LayerNorm(width), SelfAttention(width, heads)
        self.ln_2, self.intermediate, self.output = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.output(F.gelu(self.intermediate(self.ln_2(x))))


class CharTransformer(nn.Module):
    """A pre-norm causal transformer over the 96 printable characters; ``hidden`` gives the final hidden states."""

    def __init__(self, width: int = 128, layers: int = 4, context: int = 48):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.02)
        self.layers = nn.ModuleList(Block(width, max(1, width // 32)) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, VOCAB)

    def hidden(self, idx):
        h = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.layers:
            h = block(h)
        return self.ln_f(h)

    def forward(self, idx):
        return self.lm_head(self.hidden(idx))


class TextClassifier(nn.Module):
    """A classifier head on the mean of the encoder's last hidden states."""

    def __init__(self, encoder: CharTransformer, classes: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.ln_f.normalized_shape[0], classes)

    def forward(self, idx):
        return self.classifier(self.encoder.hidden(idx).mean(1))


class LoraLinear(nn.Module):
    """What PEFT puts in place of a target Linear (``peft.tuners.lora.Linear``, adapter ``default``): the frozen
    ``base_layer`` plus ``lora_B(lora_A(x)) * alpha / rank``, A Kaiming-uniform and B zero as PEFT initialises them."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, base.out_features, bias=False)})
        nn.init.kaiming_uniform_(self.lora_A["default"].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B["default"].weight)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling


class SavedCopy(nn.Module):
    """PEFT's ``modules_to_save`` wrapper: a trainable copy of a module (here the new classifier head), the
    original kept frozen beside it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(module)})

    def forward(self, x):
        return self.modules_to_save["default"](x)


def attach_lora(model: TextClassifier, rank: int = 8, alpha: float = 16.0,
                targets: tuple[str, ...] = ("query", "value")) -> list[tuple[str, nn.Parameter]]:
    """Freeze ``model``, add LoRA to ``targets`` of every attention layer and make the classifier head a trained
    copy, as ``get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
    modules_to_save=["classifier"]))`` does; the trainable parameters with the names PEFT gives them."""
    model.requires_grad_(False)
    for block in model.encoder.layers:
        for name in targets:
            setattr(block.attention, name, LoraLinear(getattr(block.attention, name), rank, alpha))
    model.classifier = SavedCopy(model.classifier)
    model.classifier.modules_to_save.requires_grad_(True)
    return [(PEFT_PREFIX + n, p) for n, p in model.named_parameters() if p.requires_grad]


#: (width, layers, context, steps, batch) -> (state dict, mean LM loss of the first and of the last 10% of steps)
_PRETRAINED: dict[tuple, tuple[dict[str, torch.Tensor], float, float]] = {}


def pretrained(width: int = 128, layers: int = 4, context: int = 48, steps: int = 300, batch: int = 32,
               lr: float = 3e-3) -> tuple[dict[str, torch.Tensor], float, float]:
    """The :class:`CharTransformer` pretrained as a causal LM on the pretraining modules' docstrings (seed 0, cached
    per process): its weights, and its training loss at the start and at the end."""
    key = (width, layers, context, steps, batch, lr)
    if key not in _PRETRAINED:
        tokens = _pretraining_text()
        torch.manual_seed(0)
        model = CharTransformer(width, layers, context)
        gen = torch.Generator().manual_seed(0)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        warm = max(1, steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * min(i, steps) / steps)))
        losses = []
        for _ in range(steps):
            starts = torch.randint(0, len(tokens) - context - 1, (batch,), generator=gen)
            idx = torch.stack([tokens[s:s + context + 1] for s in starts.tolist()])
            loss = F.cross_entropy(model(idx[:, :-1]).reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
        tenth = max(1, steps // 10)
        _PRETRAINED[key] = (model.state_dict(), sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth)
    return _PRETRAINED[key]


def _snippets(texts: list[torch.Tensor], labels: torch.Tensor, context: int, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.tensor([len(t) - context for t in texts])
    starts = (torch.rand(len(labels), generator=gen) * lengths[labels]).long()
    return torch.stack([texts[c][s:s + context] for c, s in zip(labels.tolist(), starts.tolist())])


def encoder_lora(seed: int, pretrain_steps: int = 300, width: int = 128, layers: int = 4, rank: int = 8,
                 batch: int = 16, context: int = 48, heldout: int = 192) -> Problem:
    """LoRA (query, value) and a new classifier head on the pretrained :class:`CharTransformer`, trained to tell
    which module a docstring snippet comes from (cross-entropy). The seed sets the LoRA and head initialisation,
    the training batches and the held-out snippets (``heldout`` of them, the same number per class)."""
    state, _, _ = pretrained(width, layers, context, pretrain_steps)
    torch.manual_seed(seed + 1)
    encoder = CharTransformer(width, layers, context)
    encoder.load_state_dict(state)
    model = TextClassifier(encoder, len(CLASS_MODULES))
    named = attach_lora(model, rank)
    train, test = _class_texts()
    classes = len(CLASS_MODULES)
    test_labels = torch.arange(classes).repeat_interleave(max(1, heldout // classes))
    test_x = _snippets(test, test_labels, context, torch.Generator().manual_seed(40_000 + seed))
    gen = torch.Generator().manual_seed(seed + 2)

    def loss(i: int) -> torch.Tensor:
        labels = torch.randint(0, classes, (batch,), generator=gen)
        return F.cross_entropy(model(_snippets(train, labels, context, gen)).float(), labels)

    def heldout_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(test_x).float(), test_labels).item()

    return Problem(named, loss, heldout_loss, (model,))
