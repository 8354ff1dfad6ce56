"""The optimizer engine: flat packs of tensors, technique stages, checkpoints and stats."""

from .base import FORMAT_VERSION, HinaOptimizer
from .pack import CHUNK, Bucket, Pack
from .technique import STAGES, Slot, Technique

__all__ = ["CHUNK", "FORMAT_VERSION", "STAGES", "Bucket", "HinaOptimizer", "Pack", "Slot", "Technique"]
