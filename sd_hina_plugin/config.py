"""Typed, validated optimizer configurations.

Every optimizer argument is a :class:`Field` declared by the technique that uses it. A named optimizer's
config class is a dataclass built from the fields of its techniques (:func:`make_config`). Values arrive in
three forms and all end up validated by the same code:

* typed keyword arguments, as kohya hands them after ``ast.literal_eval`` (``True``, ``0.9``, ``(0.9, 0.99)``).
  A string is accepted only by a string argument: ``lr="1e-4"`` or ``use_grams="no"`` is a TypeError;
* ``key=value`` strings (``create_optimizer(args=[...])``, :meth:`ConfigBase.from_strings`), read exactly as
  kohya's ``get_optimizer`` reads ``--optimizer_args``: split on ``=``, the value through ``ast.literal_eval``
  (``"use_spd=True"``, ``"betas=0.9,0.99"``, ``"low_precision_update='kahan'"``), so what works here works in kohya;
* TOML presets that are valid kohya ``--config_file`` fragments (:func:`load_preset`).

Every rejection is a ``TypeError`` (wrong type) or ``ValueError`` (wrong value, unknown name) whose message
names the optimizer, the argument, the value received and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

_KINDS = ("float", "int", "bool", "str", "floats", "ints")


@dataclass(frozen=True)
class Field:
    """One optimizer argument: its type, default, allowed range and help text.

    ``kind`` is one of ``float``, ``int``, ``bool``, ``str`` (optionally restricted to ``choices``) and
    ``floats`` (a tuple of ``length`` floats, each within the range) and ``ints`` (a non-empty tuple of
    integers, of ``length`` items if set). Bounds are inclusive unless ``low_open``/``high_open`` is set.
    """

    name: str
    kind: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    length: int | None = None
    #: None is a value too (its meaning is in the help text, e.g. "relative to the lr when not given")
    optional: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"field {self.name!r}: unknown kind {self.kind!r}")

    # -- description ----------------------------------------------------------------------------------
    def range_text(self) -> str:
        text = self._range_text()
        return f"{text}, or None" if self.optional else text

    def _range_text(self) -> str:
        if self.kind == "bool":
            return "True or False"
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "str":
            return "a string"
        interval = self.interval_text()
        if self.kind == "floats":
            return f"{self.length} numbers, each in {interval}"
        if self.kind == "ints":
            return f"{self.length or 'one or more'} integers, each in {interval}"
        return f"{'an integer' if self.kind == 'int' else 'a number'} in {interval}"

    def interval_text(self) -> str:
        lo = "-inf" if self.low is None else repr(self.low)
        hi = "inf" if self.high is None else repr(self.high)
        return f"{'(' if self.low is None or self.low_open else '['}{lo}, {hi}{')' if self.high is None or self.high_open else ']'}"

    # -- coercion -------------------------------------------------------------------------------------
    def coerce(self, value: Any, owner: str = "optimizer") -> Any:
        """Return ``value`` converted to this field's type, or raise a clear TypeError/ValueError."""
        where = f"{owner}: argument {self.name!r} = {value!r}"
        if value is None and self.optional:
            return None
        if isinstance(value, str) and self.kind != "str":
            # text is read only where it is text: 'key=value' items, as kohya reads them (from_strings)
            raise TypeError(f"{where} (str): expected {self.range_text()}, not a string; pass the value itself "
                            f"(e.g. {self.name}={self.to_text(self.default)}), or give text as a 'key=value' item "
                            f"(args=[...], kohya's --optimizer_args)")
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise TypeError(f"{where} ({type(value).__name__}): expected True or False")
        if self.kind == "float":
            number = self._number(value, where)
            self._check_range(number, where)
            return number
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{where} ({type(value).__name__}): expected an integer")
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(f"{where}: expected an integer, got a fraction")
                value = int(value)
            if self.choices and value not in self.choices:
                raise ValueError(f"{where}: expected {self.range_text()}")
            self._check_range(value, where)
            return value
        if self.kind == "floats":
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = (value,)
            if not isinstance(value, (tuple, list)):
                raise TypeError(f"{where} ({type(value).__name__}): expected {self.range_text()}, e.g. {self.default!r}")
            if len(value) != self.length:
                raise ValueError(f"{where}: expected {self.length} numbers, got {len(value)}")
            numbers = tuple(self._number(v, where) for v in value)
            for i, v in enumerate(numbers):
                if not self._in_range(v):
                    raise ValueError(f"{where}: element {i + 1} ({v!r}) must be in {self.interval_text()}")
            return numbers
        if self.kind == "ints":
            if isinstance(value, int) and not isinstance(value, bool):
                value = (value,)
            if not isinstance(value, (tuple, list)) or not value:
                raise TypeError(f"{where} ({type(value).__name__}): expected {self.range_text()}, e.g. {self.default!r}")
            if self.length is not None and len(value) != self.length:
                raise ValueError(f"{where}: expected {self.length} integers, got {len(value)}")
            if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise TypeError(f"{where}: expected {self.range_text()}, got {value!r}")
            for i, v in enumerate(value):
                if not self._in_range(v):
                    raise ValueError(f"{where}: element {i + 1} ({v!r}) must be in {self.interval_text()}")
            return tuple(value)
        # str
        if not isinstance(value, str):
            raise TypeError(f"{where} ({type(value).__name__}): expected {self.range_text()}")
        if self.choices and value not in self.choices:
            raise ValueError(f"{where}: expected {self.range_text()}{_suggest(value, self.choices)}")
        return value

    def _number(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where} ({type(value).__name__}): expected a number")
        number = float(value)
        if math.isnan(number):
            raise ValueError(f"{where}: NaN is not allowed")
        return number

    def _in_range(self, v: float) -> bool:
        too_low = self.low is not None and (v < self.low or (self.low_open and v == self.low))
        too_high = self.high is not None and (v > self.high or (self.high_open and v == self.high))
        return not (too_low or too_high)

    def _check_range(self, v: float, where: str) -> None:
        if not self._in_range(v):
            raise ValueError(f"{where}: must be {self.range_text()}")

    def to_text(self, value: Any) -> str:
        """A literal that kohya's ``ast.literal_eval`` and :meth:`coerce` both read back as ``value``."""
        if value is None:
            return "None"
        if self.kind == "floats":
            return "(" + ", ".join(repr(float(v)) for v in value) + ")"
        if self.kind == "ints":
            return "(" + ", ".join(str(int(v)) for v in value) + ("," if len(value) == 1 else "") + ")"
        return repr(value)


def _parse_text(text: str) -> Any:
    """``ast.literal_eval``, keeping bare words as strings: the values of ``sd-hina bench --optimizer NAME:k=v``
    specs (``sinkgd_momentum=grams``). Optimizer arguments given as text are read by :func:`kohya_literal`."""
    stripped = text.strip()
    try:
        return ast.literal_eval(stripped)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return stripped


def _suggest(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in candidates}
        close = [lowered[word.lower()]] if word.lower() in lowered else []
    return f" (did you mean {close[0]!r}?)" if close else ""


class ConfigBase:
    """Behaviour shared by every generated config dataclass."""

    FIELDS: ClassVar[dict[str, Field]] = {}
    OWNER: ClassVar[str] = "optimizer"

    def __post_init__(self) -> None:
        for name, spec in self.FIELDS.items():
            object.__setattr__(self, name, spec.coerce(getattr(self, name), self.OWNER))

    @classmethod
    def field_specs(cls) -> list[Field]:
        return list(cls.FIELDS.values())

    @classmethod
    def check_names(cls, names: Iterable[str]) -> None:
        for key in names:
            if key not in cls.FIELDS:
                raise ValueError(
                    f"{cls.OWNER}: unknown argument {key!r}{_suggest(key, cls.FIELDS)}; "
                    f"run `sd-hina show {cls.OWNER}` for the full list"
                )

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any] | None = None, **more: Any) -> "ConfigBase":
        values = dict(kwargs or {})
        values.update(more)
        cls.check_names(values)
        return cls(**values)  # type: ignore[call-arg]

    @classmethod
    def from_strings(cls, items: Iterable[str] | str) -> "ConfigBase":
        """``key=value`` items read exactly as kohya reads ``--optimizer_args`` (:func:`kohya_literal`)."""
        return cls.from_kwargs(cls.parse_strings(items))

    @classmethod
    def parse_strings(cls, items: Iterable[str] | str) -> dict[str, Any]:
        """The keyword arguments kohya would pass for these ``key=value`` items (not validated yet)."""
        if isinstance(items, str):
            items = [items]
        values: dict[str, Any] = {}
        for item in items:
            key, value = kohya_literal(item, cls.OWNER)
            if key in values:
                raise ValueError(f"{cls.OWNER}: argument {key!r} given twice")
            values[key] = value
        return values

    @classmethod
    def from_any(cls, args: Mapping[str, Any] | Iterable[str] | str | None) -> "ConfigBase":
        if args is None:
            return cls()  # type: ignore[call-arg]
        if isinstance(args, Mapping):
            return cls.from_kwargs(args)
        return cls.from_strings(args)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def to_strings(self, only_changed: bool = False) -> list[str]:
        out = []
        for name, spec in self.FIELDS.items():
            value = getattr(self, name)
            if only_changed and value == spec.coerce(spec.default, self.OWNER):
                continue
            out.append(f"{name}={spec.to_text(value)}")
        return out



def make_config(owner: str, fields: Iterable[Field], class_name: str | None = None) -> type[ConfigBase]:
    """Build a frozen dataclass with one attribute per field (defaults and validation included)."""
    specs: dict[str, Field] = {}
    for spec in fields:
        if spec.name in specs:
            if specs[spec.name] != spec:
                raise ValueError(f"{owner}: field {spec.name!r} declared twice with different definitions")
            continue
        specs[spec.name] = spec
    cls = dataclasses.make_dataclass(
        class_name or f"{owner}Config",
        [(name, Any, dataclasses.field(default=spec.default)) for name, spec in specs.items()],
        bases=(ConfigBase,),
        frozen=True,
        namespace={"FIELDS": specs, "OWNER": owner, "__doc__": f"Validated arguments of {owner}."},
    )
    return cls


# -- TOML presets -----------------------------------------------------------------------------------------

PRESET_KEYS = ("optimizer_type", "optimizer_args", "learning_rate")


def _flatten(table: Mapping[str, Any]) -> dict[str, Any]:
    """As kohya's read_config_from_file: the top-level tables' keys land in one namespace, section names ignored
    (one level: a table inside a table stays a value of its key)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(value)
        else:
            out[key] = value
    return out


def read_kohya_toml(path: str | Path) -> dict[str, Any]:
    """A kohya ``--config_file`` TOML as kohya reads it: every key of every section in one flat dict."""
    import toml

    path = Path(path)
    try:
        data = toml.load(path)
    except toml.TomlDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    return _flatten(data)


def load_preset(path: str | Path) -> dict[str, Any]:
    """Read a kohya ``--config_file`` TOML and return its optimizer keys, flattened as kohya does."""
    path = Path(path)
    flat = read_kohya_toml(path)
    found = {key: flat[key] for key in PRESET_KEYS if key in flat}
    if "optimizer_type" not in found:
        raise ValueError(f"{path}: no 'optimizer_type' key")
    args = found.get("optimizer_args", [])
    if isinstance(args, str) or not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ValueError(
            f"{path}: 'optimizer_args' must be an array of strings such as [\"weight_decay=0.01\"] "
            f"(kohya iterates a plain string character by character)"
        )
    found["optimizer_args"] = args
    if "learning_rate" in found and (isinstance(found["learning_rate"], bool) or not isinstance(found["learning_rate"], (int, float))):
        raise ValueError(f"{path}: 'learning_rate' = {found['learning_rate']!r}: expected a number")
    return found


def kohya_literal(item: str, owner: str = "optimizer") -> tuple[str, Any]:
    """Parse one optimizer arg exactly as kohya's get_optimizer does (``key, value = arg.split("=")``, then
    ``ast.literal_eval(value)``), with its failures turned into messages that say what to write."""
    if not isinstance(item, str):
        raise TypeError(f"{owner}: optimizer argument {item!r} ({type(item).__name__}): expected a 'key=value' string")
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"{owner}: {item!r}: missing '='; each optimizer argument is 'key=value' "
                         f"(write {item.strip() or 'name'}=<value>)")
    if not key.strip():
        raise ValueError(f"{owner}: {item!r}: no name before '='; each optimizer argument is 'key=value'")
    if "=" in value:
        raise ValueError(f"{owner}: {item!r}: kohya splits on every '=', so a value may not contain '='")
    if key != key.strip():
        raise ValueError(f"{owner}: {item!r}: kohya keeps spaces around the key; write {key.strip()}=...")
    if not value.strip():
        raise ValueError(f"{owner}: {item!r}: no value after '='")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        word = value.strip()
        if word.lower() in ("true", "false"):  # a boolean in lower case: say how to write it, not to quote it
            fix = f"write booleans as True/False ({key}={word.lower() == 'true'})"
        else:
            fix = f"quote strings ({key}='{word}')"
        raise ValueError(f"{owner}: {item!r}: kohya reads values with ast.literal_eval, which cannot read "
                         f"{word!r}; {fix}") from exc


#: the arguments every AdamW user looks for first, in this order (``sd-hina show`` and signatures)
COMMON_ARGUMENTS = ("lr", "betas", "beta1", "weight_decay", "eps")


def common_first(fields: Iterable[Any]) -> list[Any]:
    """Config fields with :data:`COMMON_ARGUMENTS` first, in that order, then the rest as declared."""
    rank = {name: i for i, name in enumerate(COMMON_ARGUMENTS)}
    return sorted(fields, key=lambda f: rank.get(f.name, len(rank)))


def describe_arguments(cls: type) -> None:
    """A real signature (``help()``, IDEs, ``inspect.signature``) and an argument list in the docstring, both
    generated from the config's fields, so they can never disagree with what the constructor accepts."""
    import inspect

    fields = common_first(cls.Config.field_specs())
    kind = inspect.Parameter.KEYWORD_ONLY
    parameters = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in fields:
        if f.name == "lr":
            parameters.append(inspect.Parameter("lr", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default))
        else:
            parameters.append(inspect.Parameter(f.name, kind, default=f.default))
    cls.__signature__ = inspect.Signature(parameters)
    lines = [f"    {f.name} = {f.to_text(f.default)}: {f.help} ({f.range_text()})" for f in fields]
    cls.__doc__ = (cls.__doc__ or cls.__name__).rstrip() + "\n\nArguments (keyword; kohya: --optimizer_args \"name=value\"):\n" + "\n".join(lines) + "\n"
