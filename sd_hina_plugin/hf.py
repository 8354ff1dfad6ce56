"""Our scalars in Hugging Face Trainer's logs (TensorBoard, W&B, ... whatever ``report_to`` names).

    trainer = Trainer(..., optimizer_cls_and_kwargs=(sd_hina_plugin.HinaAdamWOptimizer, {"lr": 1e-4}))
    sd_hina_plugin.hf.log_stats(trainer)

Trainer hands every callback the same ``logs`` dict in order, and its reporting callbacks come first: a callback
added with ``add_callback`` would see the dict after it was written. :func:`log_stats` puts
:class:`StatsCallback` in front, so each logging step also carries ``sd_hina_plugin.stats(optimizer)``.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("sd_hina_plugin.hf needs Hugging Face transformers (pip install transformers)") from exc

from . import stats


class StatsCallback(TrainerCallback):
    """Adds the optimizer's ``hina/*`` scalars to every log of the Trainer (reads device values: logging steps only)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, optimizer: Any = None, **kwargs: Any):
        if logs is not None and optimizer is not None:
            try:
                logs.update(stats(optimizer))
            except TypeError:  # not one of ours: nothing to add
                pass


def log_stats(trainer: Any) -> StatsCallback:
    """Insert :class:`StatsCallback` before the Trainer's reporting callbacks; returns it."""
    callback = StatsCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
