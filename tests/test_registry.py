"""Registry and public API."""

from __future__ import annotations

import importlib

import pytest
import torch

import sd_hina_plugin
from sd_hina_plugin import registry


def test_every_registered_class_is_importable_from_the_top_level():
    for spec in registry.specs():
        module, _, name = f"sd_hina_plugin.{spec.name}".rpartition(".")
        assert getattr(importlib.import_module(module), name) is spec.cls  # kohya's dotted-path import
        for alias in spec.aliases:
            assert getattr(sd_hina_plugin, alias) is spec.cls


#: upstream names users paste from their configs; kohya's "*8bit" branch only imports bitsandbytes first (a core
#: dependency here) and then falls through to the dotted path (tests/kohya builds each through kohya's rules)
UPSTREAM_8BIT_NAMES = {"Automagic_CameAMP8bit", "Automagic_CameAMP_COptim8bit"}


def test_no_name_trips_kohya_suffix_branches():
    for spec in registry.specs():
        for name in (spec.name, *spec.aliases):
            assert not name.lower().endswith("schedulefree"), name
            assert name in UPSTREAM_8BIT_NAMES or not name.lower().endswith("8bit"), name


def test_list_and_resolve():
    listed = sd_hina_plugin.list_optimizers()
    assert {"HinaAdamWCore"} <= {item["name"] for item in listed}
    assert all(item["summary"] for item in listed)
    assert registry.resolve("hinaadamwcore").name == "HinaAdamWCore"
    assert registry.resolve("sd_hina_plugin.HinaAdamWCore").name == "HinaAdamWCore"
    with pytest.raises(ValueError, match="did you mean 'HinaAdamWCore'"):
        registry.resolve("HinaAdamWCorr")


def test_create_optimizer_accepts_strings_dicts_and_kwargs():
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = sd_hina_plugin.create_optimizer("HinaAdamWCore", params, lr=0.1, args=["weight_decay=0.5", "betas=0.8,0.9"])
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert opt.param_groups[0]["weight_decay"] == 0.5
    opt = sd_hina_plugin.create_optimizer("HinaAdamWCore", params, args={"eps": 1e-6}, weight_decay=0.0)
    assert opt.param_groups[0]["eps"] == 1e-6 and opt.param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="both"):
        sd_hina_plugin.create_optimizer("HinaAdamWCore", params, args={"eps": 1e-6}, eps=1e-7)


def test_kohya_style_groups_with_dict_values_and_lr_keyword():
    """kohya passes [{"params": dict_values, "lr": x}, ...] and lr= as a keyword."""
    a, b = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4, 4))
    groups = [{"params": {"a": a}.values(), "lr": 5e-5}, {"params": {"b": b}.values(), "lr": 1e-4}]
    opt = sd_hina_plugin.HinaAdamWCore(groups, lr=1e-3, weight_decay=0.01)
    assert [g["lr"] for g in opt.param_groups] == [5e-5, 1e-4]
    with pytest.raises(ValueError, match="'lr' = -1"):
        sd_hina_plugin.HinaAdamWCore([{"params": [a], "lr": -1.0}])


def test_every_class_has_a_real_signature_and_documents_its_arguments():
    """help(), IDEs and inspect.signature see each argument with its default, lr first and AdamW's common ones next."""
    import inspect

    from sd_hina_plugin import registry

    for spec in registry.specs():
        signature = inspect.signature(spec.cls)
        names = list(signature.parameters)
        assert names[:2] == ["params", "lr"], (spec.name, names[:3])
        assert set(names[1:]) == set(spec.config.FIELDS), spec.name
        for name, field in spec.config.FIELDS.items():
            assert signature.parameters[name].default == field.default, (spec.name, name)
            assert f"    {name} = " in spec.cls.__doc__ and field.help in spec.cls.__doc__, (spec.name, name)
        if "weight_decay" in names:
            assert names.index("weight_decay") < 5, (spec.name, names[:6])


def test_create_optimizer_refuses_an_lr_given_twice():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"\['lr'\] given both in args and as keyword arguments"):
        sd_hina_plugin.create_optimizer("HinaAdamWCore", params, lr=1e-4, args=["lr=1e-3"])
    with pytest.raises(ValueError, match=r"\['lr'\] given both"):
        sd_hina_plugin.create_optimizer("HinaAdamWCore", params, lr=1e-4, args={"lr": 1e-3})
    opt = sd_hina_plugin.create_optimizer("HinaAdamWCore", params, args=["lr=1e-3"])
    assert opt.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("item, fragment", [
    ("low_precision_update=kahan", "quote strings (low_precision_update='kahan')"),
    ("use_grams=true", "write booleans as True/False (use_grams=True)"),
    ("weight_decay", "missing '='"),
])
def test_create_optimizer_reads_strings_exactly_as_kohya(item, fragment):
    """kohya's get_optimizer reads each value with ast.literal_eval: what it would reject is rejected here."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError) as info:
        sd_hina_plugin.create_optimizer("HinaAdamWOptimizer", params, args=[item])
    assert fragment in str(info.value) and "HinaAdamWOptimizer" in str(info.value)
    opt = sd_hina_plugin.create_optimizer("HinaAdamWOptimizer", params, args=["low_precision_update='kahan'", "use_grams=True"])
    assert opt.param_groups[0]["low_precision_update"] == "kahan" and opt.param_groups[0]["use_grams"] is True


@pytest.mark.parametrize("kwargs, fragment", [
    ({"lr": "1e-4"}, "'lr' = '1e-4' (str): expected a number"),
    ({"use_grams": "no"}, "'use_grams' = 'no' (str): expected True or False"),
    ({"weight_decay": "0.01"}, "'weight_decay' = '0.01' (str)"),
    ({"min_lr": "None"}, "'min_lr' = 'None' (str)"),
])
def test_keyword_arguments_take_typed_values_only(kwargs, fragment):
    """A string is a value only for a string argument: ``lr="1e-4"`` is an error naming the argument."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    name = "Automagic_CameAMP" if "min_lr" in kwargs else "HinaAdamWOptimizer"
    with pytest.raises(TypeError) as info:
        getattr(sd_hina_plugin, name)(params, **kwargs)
    assert fragment in str(info.value) and "not a string" in str(info.value)
    with pytest.raises(TypeError, match="not a string"):
        sd_hina_plugin.create_optimizer(name, params, **kwargs)
    with pytest.raises(TypeError, match="not a string"):  # a param group's values too
        getattr(sd_hina_plugin, name)([{"params": params, **kwargs}])


def test_hf_module_is_reachable_as_the_readme_writes_it():
    """``import sd_hina_plugin; sd_hina_plugin.hf.log_stats(trainer)`` in a fresh interpreter; the package itself
    does not import transformers."""
    import subprocess
    import sys

    script = ("import sys, sd_hina_plugin; assert 'transformers' not in sys.modules; "
              "print(sd_hina_plugin.hf.log_stats.__name__, sd_hina_plugin.hf.StatsCallback.__name__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["log_stats", "StatsCallback"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sd_hina_plugin.nope  # noqa: B018
