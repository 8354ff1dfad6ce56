"""The named optimizers: each a short declaration over techniques. Importing registers them."""

from .adamw_core import HinaAdamWCore
from .hina_adamw import HinaAdamWOptimizer

CustomAdamWOptimizer = HinaAdamW = CustomAdamW = HinaAdamWOptimizer

__all__ = ["CustomAdamW", "CustomAdamWOptimizer", "HinaAdamW", "HinaAdamWCore", "HinaAdamWOptimizer"]
