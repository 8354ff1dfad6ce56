"""The named optimizers: each a short declaration over techniques. Importing registers them."""

from .adamw_core import HinaAdamWCore

__all__ = ["HinaAdamWCore"]
