"""sd_hina_plugin: advanced optimizers for LoRA / LoKr training with kohya-ss/sd-scripts and plain PyTorch.

Every optimizer class is importable from here, so kohya's ``--optimizer_type sd_hina_plugin.<Name>`` works.
"""

from .config import Field, load_preset
from .engine import HinaOptimizer
from .optimizers import (AdamW_HinaAdaptive, AdamWBF16_HinaAdaptive, Automagic_CameAMP, Automagic_CameAMP8bit,
                         Automagic_CameAMP_COptim, Automagic_CameAMP_COptim8bit, Automagic_Sinkgd, COptimConfig, OptimizerConfig, CustomAdamW, CustomAdamWOptimizer, HinaAdamW,
                         HinaAdamWCore, HinaAdamWOptimizer, get_custom_adamw_optimizer)
from .registry import create_optimizer, list_optimizers, resolve

__version__ = "0.1.0"


def stats(optimizer) -> dict:
    """``optimizer.stats()`` through any wrapper (accelerate's ``AcceleratedOptimizer``, DeepSpeed's, HF Trainer's):
    the scalars to log, e.g. ``accelerator.log(sd_hina_plugin.stats(optimizer), step=step)``."""
    from .kohya.hook import unwrap

    inner = unwrap(optimizer)
    if not hasattr(inner, "stats"):
        raise TypeError(f"{type(optimizer).__name__} is not (and does not wrap) an sd_hina_plugin optimizer")
    return inner.stats()


def __getattr__(name: str):
    """``sd_hina_plugin.hf`` on first use (it imports transformers, which the rest of the package does not need)."""
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdamWBF16_HinaAdaptive",
    "AdamW_HinaAdaptive",
    "Automagic_CameAMP",
    "Automagic_CameAMP8bit",
    "Automagic_CameAMP_COptim",
    "Automagic_CameAMP_COptim8bit",
    "Automagic_Sinkgd",
    "COptimConfig",
    "CustomAdamW",
    "CustomAdamWOptimizer",
    "Field",
    "HinaAdamW",
    "HinaAdamWCore",
    "HinaAdamWOptimizer",
    "HinaOptimizer",
    "create_optimizer",
    "get_custom_adamw_optimizer",
    "list_optimizers",
    "load_preset",
    "OptimizerConfig",
    "resolve",
    "stats",
]
