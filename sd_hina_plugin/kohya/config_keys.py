"""The keys kohya's training scripts accept in a ``--config_file`` TOML, read from sd-scripts' sources.

kohya's ``read_config_from_file`` puts every key of the TOML into the argparse namespace without checking it,
so a misspelt key (``learnig_rate``) is silently ignored and the default is used. The keys kohya does read
are the ``dest`` names of the ``add_argument`` calls in its parser-building functions: ``setup_parser`` of
each training script (the top-level ``*.py`` files that call ``add_training_arguments`` or build on another
script's ``setup_parser()``, as ``sdxl_train_network.py`` does) and the ``add_*``
functions of ``library/``. They are found here with :mod:`ast`, without importing sd-scripts.

``sd-hina validate`` reads them from an sd-scripts checkout when one is found (``SD_SCRIPTS_DIR``, else
``../shared/sd-scripts``), otherwise from the list shipped in :mod:`._kohya_keys`, which
``scripts/gen_kohya_keys.py`` writes from a checkout.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path


def _dest(call: ast.Call) -> str | None:
    """The namespace attribute an ``add_argument`` call sets (its ``dest=``, else its first long option)."""
    for kw in call.keywords:
        if kw.arg == "dest" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
            return kw.value.value
    options = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if not options:
        return None
    long = [o for o in options if o.startswith("--")]
    if long:
        return long[0][2:].replace("-", "_")
    if not options[0].startswith("-"):  # a positional argument
        return options[0]
    return options[0].lstrip("-").replace("-", "_")


def _calls_in(function: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            dest = _dest(node)
            if dest:
                found.add(dest)
    return found


def keys_from_sources(root: str | Path) -> set[str]:
    """Every key kohya's training scripts accept, from the sd-scripts checkout at ``root``."""
    root = Path(root)
    keys: set[str] = set()
    for path in sorted((root / "library").glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if "add_argument(" not in text:
            continue
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("add_"):
                keys |= _calls_in(node)
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if "add_training_arguments(" not in text and ".setup_parser()" not in text:  # not a training script
            continue
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.FunctionDef) and node.name == "setup_parser":
                keys |= _calls_in(node)
    return keys


def find_sd_scripts(explicit: str | Path | None = None) -> Path | None:
    """The sd-scripts checkout to read: ``explicit``, else ``SD_SCRIPTS_DIR``, else ``../shared/sd-scripts``
    (from the current directory), when it holds ``library/train_util.py``."""
    for candidate in (explicit, os.environ.get("SD_SCRIPTS_DIR"), Path("..") / "shared" / "sd-scripts"):
        if candidate and (Path(candidate) / "library" / "train_util.py").is_file():
            return Path(candidate)
    return None


def known_keys(sd_scripts: str | Path | None = None) -> tuple[frozenset[str], str]:
    """(the keys, where they came from): from an sd-scripts checkout if one is found, else the shipped list."""
    root = find_sd_scripts(sd_scripts)
    if root is not None:
        keys = keys_from_sources(root)
        if keys:
            return frozenset(keys), f"the sd-scripts sources at {root}"
    from ._kohya_keys import KEYS, SOURCE

    return KEYS, f"the list shipped with sd_hina_plugin ({SOURCE})"
