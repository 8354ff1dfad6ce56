"""Logging inside kohya sd-scripts with no setup beyond ``--optimizer_type`` and ``--log_with tensorboard``.

kohya's ``NetworkTrainer.train`` builds the optimizer through ``get_optimizer``, so when one of our optimizers
is constructed, a calling frame holds the trainer (``self``, which has ``generate_step_logs``), ``network``
and ``lr_descriptions``. :func:`attach` then

* names the param groups after kohya's ``lr_descriptions`` (``unet``, ``textencoder``, ``unet plus``, ...), so
  ``stats()`` reports ``hina/lr/unet``;
* replaces ``generate_step_logs`` **on that trainer instance** with a wrapper. The wrapper calls kohya's method,
  adds ``optimizer.stats()`` to the returned logs, and hands ``current_loss`` to ``optimizer.observe_loss``
  when the optimizer has that method. kohya sends the logs straight to its accelerate trackers
  (``tracker.log``), so the scalars reach TensorBoard. Wrapping ``accelerator.log`` would not work: kohya
  bypasses it for step logs.

The wrapper holds the optimizer through a weak reference and never raises. If stats fail, it logs the
error once and returns kohya's logs unchanged. kohya calls ``generate_step_logs`` only when a tracker is
active, so without ``--log_with`` / ``--logging_dir`` nothing runs. Outside kohya :func:`attach` does
nothing. If kohya's ``library.train_util`` is loaded but no trainer frame is found, it says once that it
could not attach.

The full fine-tune scripts (``fine_tune.py``, ``train_db.py``, ``sdxl_train.py``, ``sd3_train.py``,
``flux_train.py``, ``lumina_train.py``, ...) have no trainer class: their ``train(args)`` builds the optimizer
(one per block under ``--fused_optimizer_groups`` / ``--blockwise_fused_optimizers``) and sends its step logs
through ``accelerator.log``. There :func:`attach` wraps ``log`` on that accelerator instance instead, and the
step logs (those with a ``"loss"`` key) get one merged set of scalars of every optimizer (:func:`merged_stats`).
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Any, Callable

from ..lora.discovery import find_kohya_script_frame, find_kohya_trainer_frame

logger = logging.getLogger("sd_hina_plugin")
_MARK = "_sd_hina_wrapped"
_warned: list[bool] = []


def unwrap(optimizer: Any) -> Any:
    """The optimizer inside accelerate's AcceleratedOptimizer (and DeepSpeed's wrapper)."""
    seen = 0
    while hasattr(optimizer, "optimizer") and not hasattr(optimizer, "stats") and seen < 4:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def feed_loss(opt: Any, loss: Any) -> None:
    """Hand kohya's step loss to an optimizer that takes it (``observe_loss``: the COptim context's loss trend), in a
    single process only. kohya logs on the main process alone, so under several processes only rank 0 would see the
    loss, its lr multiplier would follow it, and replicas that DDP keeps equal would drift apart; there the context
    follows the gradients alone (the same on every rank), and the log says so once."""
    observe = getattr(opt, "observe_loss", None)
    if observe is None or loss is None:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if not getattr(opt, "_sd_hina_loss_note", False):
            opt._sd_hina_loss_note = True
            logger.info("%s: %d processes: the step loss, which kohya logs on the main process only, is not used (the "
                        "context follows the gradients, the same on every rank)", type(opt).__name__, dist.get_world_size())
        return
    observe(loss)


#: kohya's signature: generate_step_logs(self, args, current_loss, avr_loss, lr_scheduler, lr_descriptions,
#: optimizer=None, ...); positions below count from ``args``
_LOSS, _OPTIMIZER = 1, 5


def wrap_step_logs(original: Callable[..., dict], get_optimizer: Callable[[tuple, dict], Any],
                   offset: int = 0) -> Callable[..., dict]:
    """A ``generate_step_logs`` that adds the optimizer's stats and feeds it the loss.

    ``offset`` is the number of positional arguments before kohya's ``args`` (1 when wrapping the function on
    the class, where ``self`` comes first); ``get_optimizer(positional, kwargs)`` returns our optimizer or None."""
    failed = []

    def generate_step_logs(*args: Any, **kwargs: Any) -> dict:
        logs = original(*args, **kwargs)
        try:
            positional = args[offset:]
            opt = get_optimizer(positional, kwargs)
            if opt is None:
                return logs
            loss = kwargs.get("current_loss", positional[_LOSS] if len(positional) > _LOSS else None)
            feed_loss(opt, loss)
            if isinstance(logs, dict):
                logs.update(opt.stats())
        except Exception as exc:  # logging must never break training
            if not failed:
                failed.append(exc)
                logger.warning("sd_hina_plugin: could not add optimizer stats to kohya's logs: %s", exc)
        return logs

    setattr(generate_step_logs, _MARK, True)
    return generate_step_logs


def _optimizer_argument(args: tuple, kwargs: dict) -> Any:
    optimizer = kwargs.get("optimizer", args[_OPTIMIZER] if len(args) > _OPTIMIZER else None)
    optimizer = unwrap(optimizer) if optimizer is not None else None
    return optimizer if hasattr(optimizer, "stats") else None


def install_on_class(trainer_cls: type) -> None:
    """Wrap ``generate_step_logs`` of a trainer class (the launcher's explicit install). The optimizer is taken
    from the ``optimizer`` argument kohya passes to each call."""
    original = trainer_cls.generate_step_logs
    if getattr(original, _MARK, False):
        return
    trainer_cls.generate_step_logs = wrap_step_logs(original, _optimizer_argument, offset=1)


def merged_stats(optimizers: list[Any]) -> dict[str, float]:
    """One set of scalars for several optimizers of one run (kohya's per-block optimizers): their groups carry
    distinct names (see :func:`attach`), so per-group keys do not collide; skipped-tensor counts add up, and other
    shared keys take the largest (``..._max``, ``/max``), the smallest (``..._min``, ``/min``) or the mean value."""
    if len(optimizers) == 1:
        return optimizers[0].stats()
    seen: dict[str, list[float]] = {}
    for opt in optimizers:
        for key, value in opt.stats().items():
            seen.setdefault(key, []).append(value)
    out = {}
    for key, values in seen.items():
        if key == "hina/nonfinite_skipped":
            out[key] = sum(values)
        elif key.endswith(("_max", "/max")):
            out[key] = max(values)
        elif key.endswith(("_min", "/min")):
            out[key] = min(values)
        else:
            out[key] = sum(values) / len(values)
    return out


def _attach_to_accelerator(optimizer: Any, local: dict[str, Any]) -> bool:
    """A full fine-tune script (no trainer class): it logs its step logs (those with ``"loss"``) through
    ``accelerator.log``, so that method, on this accelerator only, adds the stats of every optimizer of ours the
    script built (several under ``--fused_optimizer_groups`` / ``--blockwise_fused_optimizers``) and feeds them
    the loss."""
    accelerator = local["accelerator"]
    registry = getattr(accelerator, "_sd_hina_optimizers", None)
    if registry is None:
        registry = []
        original = accelerator.log
        failed: list[Exception] = []

        def log(values: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                if isinstance(values, dict) and "loss" in values:
                    live = [o for o in (ref() for ref in registry) if o is not None]
                    for opt in live:
                        feed_loss(opt, values["loss"])
                    if live:
                        values = {**values, **merged_stats(live)}
            except Exception as exc:  # logging must never break training
                if not failed:
                    failed.append(exc)
                    logger.warning("sd_hina_plugin: could not add optimizer stats to kohya's logs: %s", exc)
            return original(values, *args, **kwargs)

        setattr(log, _MARK, True)
        accelerator.log = log
        accelerator._sd_hina_optimizers = registry
    registry.append(weakref.ref(optimizer))
    live = [o for o in (ref() for ref in registry) if o is not None]
    if len(live) > 1:  # one optimizer per block: groups named after their block, so that stats() keys stay apart
        blocks = local.get("block_types_and_indices")  # flux_train.py --blockwise_fused_optimizers names them
        for i, opt in enumerate(live):
            if len(opt.param_groups) == 1:
                label = blocks[i] if isinstance(blocks, (list, tuple)) and len(blocks) >= len(live) else f"block{i:02d}"
                if isinstance(label, (tuple, list)):  # flux_train.py's keys: ("double", 0) -> double_0
                    label = "_".join(str(part) for part in label)
                opt.param_groups[0].setdefault("hina_desc", str(label).replace(" ", "_"))  # (a name set by hand stays)
    if len(live) == 1:
        logger.info("%s: attached to kohya's step logs (hina/* scalars)", type(optimizer).__name__)
    return True


def attach(optimizer: Any) -> bool:
    """Attach ``optimizer`` to the kohya trainer or script that is constructing it, if any. Returns True if
    attached."""
    local = find_kohya_trainer_frame()
    if local is None:
        script = find_kohya_script_frame()
        if script is not None:
            return _attach_to_accelerator(optimizer, script)
        if "library.train_util" in sys.modules and not _warned:
            _warned.append(True)
            logger.warning("%s: kohya is loaded but neither its trainer nor a training script's train() was found among "
                           "the callers, so optimizer stats will not reach its logs; add them yourself with "
                           "accelerator.log(sd_hina_plugin.stats(optimizer), step=step)", type(optimizer).__name__)
        return False
    trainer = local["self"]
    descriptions = local.get("lr_descriptions")
    if isinstance(descriptions, (list, tuple)) and len(descriptions) == len(optimizer.param_groups):
        for group, desc in zip(optimizer.param_groups, descriptions):
            group.setdefault("hina_desc", str(desc).strip().replace(" ", "_"))
    current = trainer.generate_step_logs
    if getattr(current, _MARK, False):
        return True  # the launcher (or an earlier optimizer) already wrapped it
    ref = weakref.ref(optimizer)
    trainer.generate_step_logs = wrap_step_logs(current, lambda a, k: ref())
    logger.info("%s: attached to kohya's step logs (hina/* scalars)", type(optimizer).__name__)
    return True
