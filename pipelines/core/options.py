"""Job options, declared once.

Each job's configuration is a frozen dataclass whose fields carry their flag's help, range,
choices and group (:func:`option`). The job's command-line parser is generated from it
(``jobs/_cli.py``), a config file's keys are its field names, and the checks run whenever a
config is made (:func:`check_options`, from ``__post_init__``): from flags, from a file or from
Python, the flags, their defaults and their checks cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cache
from typing import Any

from pipelines.core.errors import UserError


class ConfigError(UserError):
    """Bad job options or config file (the message names the flag or key)."""


@dataclass(frozen=True)
class Option:
    """How one config field is a flag: its help, the values it allows, where ``--help`` lists
    it, and how text becomes a value (flags, and strings from a config file)."""

    help: str
    min: float | None = None  # value >= min
    above: float | None = None  # value > above
    max: float | None = None  # value <= max
    below: float | None = None  # value < below
    choices: tuple[str, ...] | None = None
    group: str | None = None
    parse: Callable[[str], Any] | None = None


def option(default: Any = dataclasses.MISSING, help: str = "", **how: Any) -> Any:
    """A config field that is also a flag (``--name-with-dashes``); without ``default`` the
    flag is required. ``how``: the other :class:`Option` fields."""
    return dataclasses.field(default=default, metadata={"option": Option(help=help, **how)})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Declared:
    """One option of a config class: its field name, base type (``int`` for ``int | None``),
    default (``dataclasses.MISSING``: required) and :class:`Option`."""

    name: str
    base: type
    default: Any
    option: Option

    @property
    def flag(self) -> str:
        return flag(self.name)


@cache
def declared(cls: type) -> tuple[Declared, ...]:
    """The options of config class ``cls``: its own in field order, then those it takes from
    its bases (shared options such as ``--progress-seconds``, listed last by ``--help``)."""
    hints = typing.get_type_hints(cls)
    own = set(cls.__dict__.get("__annotations__", {}))
    out = []
    for f in sorted(fields(cls), key=lambda f: f.name not in own):
        opt = f.metadata.get("option")
        if opt is not None:
            out.append(Declared(f.name, _base(hints[f.name]), f.default, opt))
    return tuple(out)


def _base(hint: Any) -> type:
    """``int`` for ``int``, ``int | None`` and ``Optional[int]``; the origin of generics."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        [hint] = [a for a in typing.get_args(hint) if a is not type(None)]
    return typing.get_origin(hint) or hint


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_options(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming the flag for the first option of ``cfg`` whose value
    is of the wrong type, not among its choices or out of its range (None: not set)."""
    for d in declared(type(cfg)):
        value = getattr(cfg, d.name)
        if value is None:
            continue
        o = d.option
        wanted = (int, float) if d.base is float else d.base
        if d.base in (int, float, str, bool) and (
            not isinstance(value, wanted) or (d.base is not bool and isinstance(value, bool))
        ):
            raise ConfigError(f"{d.flag} must be {d.base.__name__}, got {value!r}")
        if o.choices is not None and value not in o.choices:
            raise ConfigError(f"unknown {d.flag} {value!r}; choose one of {', '.join(o.choices)}")
        low = (
            (">=", o.min) if o.min is not None else (">", o.above) if o.above is not None else None
        )
        high = (
            ("<=", o.max) if o.max is not None else ("<", o.below) if o.below is not None else None
        )
        ok = all(
            {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
            for op, bound in (b for b in (low, high) if b is not None)
        )
        if ok:
            continue
        if low and high:
            span = f"in {'[' if low[0] == '>=' else '('}{_text(low[1])}, {_text(high[1])}"
            span += "]" if high[0] == "<=" else ")"
        else:
            op, bound = low or high
            span = f"{op} {_text(bound)}"
        raise ConfigError(f"{d.flag} must be {span}, got {_text(value)}")


def as_dict(cfg: Any) -> dict[str, Any]:
    """The option values of ``cfg`` (shallow: a plain dict that pickles and logs)."""
    return {d.name: getattr(cfg, d.name) for d in declared(type(cfg))}
