"""``sd-hina-train SCRIPT.py [kohya arguments...]``: run any kohya training script with our hook installed.

Use it when the automatic hook cannot attach (a trainer that renamed ``train()``'s locals) or to write short
names: ``--optimizer_type HinaAdamW`` (in the arguments or in a ``--config_file`` TOML) becomes
``sd_hina_plugin.HinaAdamWOptimizer``.

What it does, as kohya's own ``__main__`` block would: puts the script's folder first on ``sys.path``,
imports the script under its module name (so ``sdxl_train_network.py``'s ``import train_network`` finds the
same module), wraps ``generate_step_logs`` of the script's trainer class (``*train_network.py``), then runs
``setup_parser()``, ``parse_args()``, ``train_util.verify_command_line_training_args``,
``train_util.read_config_from_file`` and ``Trainer().train(args)``, or, for a script without a trainer class
(``fine_tune.py``, ``train_db.py``, ``sdxl_train.py``, ``flux_train.py``, ...), its ``train(args)``.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
from pathlib import Path
from typing import Sequence

from .. import registry
from .hook import install_on_class

logger = logging.getLogger("sd_hina_plugin")


def resolve_optimizer_type(value: str) -> str:
    """``HinaAdamW`` -> ``sd_hina_plugin.HinaAdamWOptimizer``; anything else (kohya's own names, other
    packages' dotted paths) unchanged."""
    if not isinstance(value, str) or ("." in value and not value.startswith("sd_hina_plugin.")):
        return value
    try:
        return f"sd_hina_plugin.{registry.resolve(value).name}"
    except ValueError:
        return value


def rewrite_arguments(argv: Sequence[str]) -> list[str]:
    out = list(argv)
    for i, item in enumerate(out):
        if item == "--optimizer_type" and i + 1 < len(out):
            out[i + 1] = resolve_optimizer_type(out[i + 1])
        elif item.startswith("--optimizer_type="):
            out[i] = "--optimizer_type=" + resolve_optimizer_type(item.split("=", 1)[1])
    return out


def trainer_class(module) -> type:
    """The most derived class defined in the script that has ``train`` and ``generate_step_logs``."""
    found = [obj for _, obj in inspect.getmembers(module, inspect.isclass)
             if obj.__module__ == module.__name__ and hasattr(obj, "train") and hasattr(obj, "generate_step_logs")]
    leaves = [c for c in found if not any(o is not c and issubclass(o, c) for o in found)]
    if len(leaves) != 1:
        raise SystemExit(f"sd-hina-train: expected one trainer class in {module.__file__}, found {[c.__name__ for c in leaves]}")
    return leaves[0]


def load_script(path: Path):
    sys.path.insert(0, str(path.parent))
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    script = Path(argv[0]).resolve()
    if not script.is_file():
        raise SystemExit(f"sd-hina-train: no such script: {argv[0]}")
    sys.argv = [str(script)] + rewrite_arguments(argv[1:])
    module = load_script(script)
    # a *train_network.py trainer class gets the hook on the class; a script without one (the full fine-tunes:
    # train(args)) is hooked when it builds the optimizer, through its accelerator (see kohya/hook.py)
    cls = trainer_class(module) if not callable(getattr(module, "train", None)) else None
    if cls is not None:
        install_on_class(cls)
    parser = module.setup_parser()
    args = parser.parse_args()
    train_util = module.train_util
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    if getattr(args, "optimizer_type", None):
        args.optimizer_type = resolve_optimizer_type(args.optimizer_type)
    logger.info("sd-hina-train: %s with %s, optimizer_type=%s", script.name, cls.__name__ if cls else "train(args)",
                getattr(args, "optimizer_type", None))
    if cls is not None:
        cls().train(args)
    else:
        module.train(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
