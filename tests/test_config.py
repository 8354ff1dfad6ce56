"""Config parsing: kohya-typed kwargs, key=value strings, TOML presets, clear rejections, round trips."""

from __future__ import annotations

import ast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sd_hina_plugin import registry
from sd_hina_plugin.config import Field, kohya_literal, make_config, split_arg

Demo = make_config("Demo", [
    Field("lr", "float", 1e-3, "learning rate", low=0.0),
    Field("betas", "floats", (0.9, 0.999), "decays", low=0.0, high=1.0, high_open=True, length=2),
    Field("use_x", "bool", True, "switch"),
    Field("steps", "int", 500, "count", low=0),
    Field("mode", "str", "a", "mode", choices=("a", "bee")),
])


@pytest.mark.parametrize("item, key, value", [
    ("use_x=true", "use_x", True),
    ("use_x=False", "use_x", False),
    ("use_x = off", "use_x", False),
    ("betas=0.9,0.99", "betas", (0.9, 0.99)),
    ("betas=(0.9, 0.99)", "betas", (0.9, 0.99)),
    ("betas=[0.5,0.5]", "betas", (0.5, 0.5)),
    ("steps=1e3", "steps", 1000),
    ("lr=5e-5", "lr", 5e-5),
    ("mode='bee'", "mode", "bee"),
    ("mode=bee", "mode", "bee"),
])
def test_string_forms(item, key, value):
    assert getattr(Demo.from_strings([item]), key) == value


def test_value_containing_equals_sign_is_kept_whole():
    key, value = split_arg("mode=a=b")
    assert (key, value) == ("mode", "a=b")
    with pytest.raises(ValueError, match="'mode' = 'a=b'"):
        Demo.from_strings(["mode=a=b"])


@pytest.mark.parametrize("kwargs, exc, fragment", [
    ({"lr": -1.0}, ValueError, "'lr' = -1.0: must be a number in [0.0, inf)"),
    ({"lr": "fast"}, TypeError, "'lr' = 'fast' (str): expected a number"),
    ({"betas": (0.9, 1.0)}, ValueError, "element 2 (1.0) must be in [0.0, 1.0)"),
    ({"betas": (0.9,)}, ValueError, "expected 2 numbers, got 1"),
    ({"use_x": "maybe"}, TypeError, "'use_x' = 'maybe' (str): expected True or False"),
    ({"steps": 2.5}, ValueError, "'steps' = 2.5: expected an integer"),
    ({"mode": "be"}, ValueError, "did you mean 'bee'"),
    ({"lrr": 1.0}, ValueError, "unknown argument 'lrr' (did you mean 'lr'?)"),
    ({"lr": float("nan")}, ValueError, "NaN"),
])
def test_rejections_name_argument_value_and_range(kwargs, exc, fragment):
    with pytest.raises(exc) as info:
        Demo.from_kwargs(kwargs)
    assert fragment in str(info.value)
    assert str(info.value).startswith("Demo: ")


def test_malformed_items():
    with pytest.raises(ValueError, match="expected the form 'key=value'"):
        Demo.from_strings(["use_x"])
    with pytest.raises(ValueError, match="given twice"):
        Demo.from_strings(["lr=1", "lr=2"])


def test_kohya_literal_mirrors_kohya_rules():
    assert kohya_literal("betas=0.9,0.99") == ("betas", (0.9, 0.99))
    assert kohya_literal("mode='a'") == ("mode", "a")
    with pytest.raises(ValueError, match="quote strings"):
        kohya_literal("mode=a")
    with pytest.raises(ValueError, match="True/False"):
        kohya_literal("use_x=true")
    with pytest.raises(ValueError, match="may not contain"):
        kohya_literal("mode='a=b'")


floats01 = st.floats(min_value=0.0, max_value=0.999999, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(lr=st.floats(min_value=0.0, max_value=1e3, allow_nan=False), b1=floats01, b2=floats01,
       use_x=st.booleans(), steps=st.integers(min_value=0, max_value=10**9), mode=st.sampled_from(["a", "bee"]))
def test_round_trip_through_strings_and_kohya(lr, b1, b2, use_x, steps, mode):
    cfg = Demo(lr=lr, betas=(b1, b2), use_x=use_x, steps=steps, mode=mode)
    strings = cfg.to_strings()
    assert Demo.from_strings(strings) == cfg
    # what kohya would hand over after split("=") + ast.literal_eval:
    assert Demo.from_kwargs(dict(kohya_literal(s) for s in strings)) == cfg
    assert all(ast.literal_eval(s.partition("=")[2]) is not None for s in strings)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_arbitrary_strings_fail_only_with_our_errors(items):
    for spec in registry.specs():
        try:
            spec.config.from_strings(items)
        except (TypeError, ValueError) as exc:
            assert spec.name in str(exc)


def test_only_changed_strings():
    cfg = Demo(lr=0.5)
    assert cfg.to_strings(only_changed=True) == ["lr=0.5"]
