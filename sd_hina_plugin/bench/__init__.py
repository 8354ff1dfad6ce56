"""The built-in benchmark behind ``sd-hina bench``: LoRA/LoKr adaptation tasks and classic problems."""

from .runner import bench
from .tasks import TASKS

__all__ = ["TASKS", "bench"]
