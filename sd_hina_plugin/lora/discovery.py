"""Recovering parameter names when the caller passes none (kohya never does).

Sources, in the order tried:

``HinaOptimizer._discover_names`` applies them in this order:

1. ``param_names`` in the param groups: torch's own mechanism (``Optimizer(model.named_parameters())``),
   or written by :meth:`HinaOptimizer.attach_names`.
2. a string ``param_name`` attribute on the parameter (``p.param_name = name``, the upstream fork's advice for
   code that builds its groups by hand).
3. **kohya frame**: when kohya's ``NetworkTrainer.train`` builds the optimizer, its frame has the locals
   ``network`` (the LoRA network; ``named_parameters()`` gives ``lora_unet_....lora_down.weight``) and
   ``self`` (the trainer). Walking up from the constructor finds it; this works for every
   ``*train_network.py`` subclass, which inherit ``train``. In a full fine-tune script (``train(args)``, no
   trainer class) the models in that function's locals name their own parameters (``unet.down_blocks...``).
4. **module scan**: every live ``nn.Module`` with a string attribute ``lora_name`` (kohya LoRAModule, LyCORIS
   modules, Flux/SD3 LoRA modules) names its own parameters ``f"{lora_name}.{param_name}"``. Costs one
   pass over the garbage collector's objects (~0.1 s), and is tried only when 1 to 3 left names missing.

Without names the optimizer says so once in the log and classifies by shape (``lora/layout.py``).
"""

from __future__ import annotations

import gc
import inspect
import warnings
from typing import Any, Iterable

import torch
from torch import nn

MAX_FRAMES = 64


def names_from_groups(param_groups: list[dict[str, Any]]) -> dict[int, str]:
    names: dict[int, str] = {}
    for group in param_groups:
        group_names = group.get("param_names")
        if group_names and len(group_names) == len(group["params"]):
            names.update((id(p), n) for p, n in zip(group["params"], group_names))
    return names


def names_from_attributes(params: Iterable[torch.Tensor]) -> dict[int, str]:
    """``p.param_name`` where a parameter carries one (a non-empty string)."""
    return {id(p): p.param_name for p in params if isinstance(getattr(p, "param_name", None), str) and p.param_name}


def _cover(module: nn.Module, wanted: set[int]) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters() if id(p) in wanted}


def _nearest_frame(matches, max_frames: int) -> dict[str, Any] | None:
    """Locals of the nearest calling frame whose locals satisfy ``matches``."""
    frame = inspect.currentframe()
    try:
        depth = 0
        while frame is not None and depth < max_frames:
            local = frame.f_locals
            if matches(local):
                return dict(local)
            frame = frame.f_back
            depth += 1
        return None
    finally:
        del frame


def find_kohya_trainer_frame(max_frames: int = MAX_FRAMES) -> dict[str, Any] | None:
    """Locals of the nearest calling frame that looks like kohya's ``NetworkTrainer.train``."""
    return _nearest_frame(lambda local: isinstance(local.get("network"), nn.Module) and local.get("self") is not None
                          and hasattr(local["self"], "generate_step_logs"), max_frames)


def find_kohya_script_frame(max_frames: int = MAX_FRAMES) -> dict[str, Any] | None:
    """Locals of the nearest calling frame that looks like the ``train(args)`` function of a kohya script without a
    trainer class (the full fine-tunes: ``fine_tune.py``, ``train_db.py``, ``sdxl_train.py``, ``sd3_train.py``,
    ``flux_train.py``, ...): it holds kohya's ``args`` and the ``accelerator`` it logs through, made before the
    optimizer in every such script."""
    return _nearest_frame(lambda local: hasattr(local.get("accelerator"), "log") and hasattr(local.get("accelerator"), "trackers")
                          and hasattr(local.get("args"), "optimizer_type"), max_frames)


def names_from_kohya_frame(params: Iterable[torch.Tensor]) -> dict[int, str]:
    """Names from kohya's frames: the LoRA ``network`` of a trainer, or, in a full fine-tune script, every model it
    holds (``unet``, ``text_encoder1``, ``flux``, ...: their own parameter names)."""
    wanted = {id(p) for p in params}
    local = find_kohya_trainer_frame()
    if local is not None:
        return _cover(local["network"], wanted)
    local = find_kohya_script_frame()
    names: dict[int, str] = {}
    for key, value in (local or {}).items():
        if isinstance(value, nn.Module):
            for pid, name in _cover(value, wanted).items():
                names.setdefault(pid, f"{key}.{name}")
    return names


def names_from_module_scan(params: Iterable[torch.Tensor]) -> dict[int, str]:
    wanted = {id(p) for p in params}
    names: dict[int, str] = {}
    with warnings.catch_warnings():  # isinstance() on deprecated proxy objects warns
        warnings.simplefilter("ignore")
        modules = []
        for obj in gc.get_objects():
            try:
                if isinstance(obj, nn.Module):
                    modules.append(obj)
            except Exception:  # objects with unusual __class__
                continue
    for obj in modules:
        lora_name = getattr(obj, "lora_name", None)
        if isinstance(lora_name, str):
            for pname, p in obj.named_parameters():
                if id(p) in wanted:
                    names.setdefault(id(p), f"{lora_name}.{pname}")
    return names
