"""Every preset in configs/ is a valid kohya --config_file fragment for a registered optimizer."""

from __future__ import annotations

import pytest
import toml
from support import PRESETS

from sd_hina_plugin import registry
from sd_hina_plugin.config import kohya_literal, load_preset


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_kohya_valid(path):
    preset = load_preset(path)
    spec = registry.resolve(preset["optimizer_type"])
    assert preset["optimizer_type"] == f"sd_hina_plugin.{spec.name}"
    assert isinstance(preset["learning_rate"], float)
    kwargs = dict(kohya_literal(item, spec.name) for item in preset["optimizer_args"])
    spec.config.from_kwargs(kwargs)
    spec.config.from_strings(preset["optimizer_args"])


def test_presets_exist():
    assert len(PRESETS) >= 1


def test_bad_preset_messages(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('optimizer_type = "sd_hina_plugin.HinaAdamWCore"\noptimizer_args = "weight_decay=0.1"\n')
    with pytest.raises(ValueError, match="array of strings"):
        load_preset(bad)
    bad.write_text("optimizer_args = []\n")
    with pytest.raises(ValueError, match="no 'optimizer_type'"):
        load_preset(bad)
    bad.write_text("optimizer_type = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_preset(bad)
    nested = tmp_path / "nested.toml"
    toml.dump({"training": {"max_train_steps": 10}, "opt": {"optimizer_type": "sd_hina_plugin.HinaAdamWCore"}}, nested.open("w"))
    assert load_preset(nested)["optimizer_type"].endswith("HinaAdamWCore")
