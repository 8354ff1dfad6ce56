"""Config parsing: kohya-typed kwargs, key=value strings, TOML presets, clear rejections, round trips."""

from __future__ import annotations

import ast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sd_hina_plugin import registry
from sd_hina_plugin.config import Field, kohya_literal, make_config

Demo = make_config("Demo", [
    Field("lr", "float", 1e-3, "learning rate", low=0.0),
    Field("betas", "floats", (0.9, 0.999), "decays", low=0.0, high=1.0, high_open=True, length=2),
    Field("use_x", "bool", True, "switch"),
    Field("steps", "int", 500, "count", low=0),
    Field("mode", "str", "a", "mode", choices=("a", "bee")),
])


@pytest.mark.parametrize("item, key, value", [
    ("use_x=True", "use_x", True),
    ("use_x=False", "use_x", False),
    ("use_x=0", "use_x", False),
    ("betas=0.9,0.99", "betas", (0.9, 0.99)),
    ("betas=(0.9, 0.99)", "betas", (0.9, 0.99)),
    ("betas=[0.5,0.5]", "betas", (0.5, 0.5)),
    ("steps=1e3", "steps", 1000),
    ("lr=5e-5", "lr", 5e-5),
    ("lr= 5e-5", "lr", 5e-5),
    ("mode='bee'", "mode", "bee"),
])
def test_string_forms(item, key, value):
    assert getattr(Demo.from_strings([item]), key) == value


@pytest.mark.parametrize("item, fragment", [
    ("mode=bee", "quote strings (mode='bee')"),
    ("use_x=true", "write booleans as True/False (use_x=True)"),
    ("use_x=off", "quote strings"),  # then: a string is not a bool
    ("use_x = False", "kohya keeps spaces around the key"),
    ("mode='a=b'", "may not contain '='"),
    ("use_x", "missing '='"),
    ("lr=", "no value after '='"),
    ("=1", "no name before '='"),
])
def test_strings_are_read_as_kohya_reads_them(item, fragment):
    """What kohya's get_optimizer (split on '=', ast.literal_eval) would reject is rejected, saying what to write."""
    with pytest.raises(ValueError) as info:
        Demo.from_strings([item])
    assert fragment in str(info.value) and str(info.value).startswith("Demo: ")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"lr": "1e-4"}, "'lr' = '1e-4' (str): expected a number in [0.0, inf), not a string"),
    ({"use_x": "no"}, "'use_x' = 'no' (str): expected True or False, not a string"),
    ({"use_x": "True"}, "'use_x' = 'True' (str): expected True or False, not a string"),
    ({"steps": "5"}, "'steps' = '5' (str): expected an integer"),
    ({"betas": "0.9,0.99"}, "'betas' = '0.9,0.99' (str)"),
])
def test_keyword_strings_are_not_read_as_values(kwargs, fragment):
    """Typed keyword arguments take typed values: a string is text, read only from 'key=value' items."""
    with pytest.raises(TypeError) as info:
        Demo.from_kwargs(kwargs)
    assert fragment in str(info.value) and "'key=value'" in str(info.value)


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
    with pytest.raises(ValueError, match="given twice"):
        Demo.from_strings(["lr=1", "lr=2"])
    with pytest.raises(TypeError, match="expected a 'key=value' string"):
        Demo.from_strings([("lr", 1)])


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
