"""The named optimizers: each a short declaration over techniques. Importing registers them."""

from .adamw_core import HinaAdamWCore
from .automagic_cameamp import (Automagic_CameAMP, Automagic_CameAMP8bit, Automagic_CameAMP_COptim, Automagic_CameAMP_COptim8bit,
                                COptimConfig, OptimizerConfig)
from .automagic_sinkgd import Automagic_Sinkgd
from .hina_adamw import HinaAdamWOptimizer, get_custom_adamw_optimizer
from .hina_adaptive import AdamW_HinaAdaptive, AdamWBF16_HinaAdaptive

CustomAdamWOptimizer = HinaAdamW = CustomAdamW = HinaAdamWOptimizer

__all__ = ["AdamWBF16_HinaAdaptive", "AdamW_HinaAdaptive", "Automagic_CameAMP", "Automagic_CameAMP8bit", "Automagic_CameAMP_COptim",
           "Automagic_CameAMP_COptim8bit", "Automagic_Sinkgd", "COptimConfig", "OptimizerConfig", "CustomAdamW", "CustomAdamWOptimizer", "HinaAdamW",
           "HinaAdamWCore", "HinaAdamWOptimizer", "get_custom_adamw_optimizer"]
