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
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Any, Callable

from ..lora.discovery import find_kohya_trainer_frame

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
            observe = getattr(opt, "observe_loss", None)
            if observe is not None and loss is not None:
                observe(loss)
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


def attach(optimizer: Any) -> bool:
    """Attach ``optimizer`` to the kohya trainer that is constructing it, if any. Returns True if attached."""
    local = find_kohya_trainer_frame()
    if local is None:
        if "library.train_util" in sys.modules and not _warned:
            _warned.append(True)
            logger.warning("%s: kohya is loaded but its trainer was not found among the callers, so optimizer stats "
                           "will not reach its logs; run the script through sd-hina-train to install the hook",
                           type(optimizer).__name__)
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
