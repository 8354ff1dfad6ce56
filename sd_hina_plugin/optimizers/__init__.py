"""The named optimizers: each a short declaration over techniques. Importing registers them."""

from .adamw_core import HinaAdamWCore
from .hina_adamw import HinaAdamWOptimizer
from .hina_adaptive import AdamW_HinaAdaptive, AdamWBF16_HinaAdaptive

CustomAdamWOptimizer = HinaAdamW = CustomAdamW = HinaAdamWOptimizer

__all__ = ["AdamWBF16_HinaAdaptive", "AdamW_HinaAdaptive", "CustomAdamW", "CustomAdamWOptimizer", "HinaAdamW",
           "HinaAdamWCore", "HinaAdamWOptimizer"]
