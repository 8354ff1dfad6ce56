"""LoRA / LoKr / LoHa awareness: roles from names, pairing, name discovery, factored norms."""

from .layout import LoraLayout
from .names import Role, classify, pair

__all__ = ["LoraLayout", "Role", "classify", "pair"]
