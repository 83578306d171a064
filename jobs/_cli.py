"""What every job's door shares: a parser generated from the job's config class (each option
declared once, in :mod:`pipelines.core.options`), YAML config files, and bad input as one clear
line instead of a stack trace."""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import MISSING
from typing import Any, TypeVar

import yaml

from pipelines.core.errors import Exit, UserError, exit_status_table
from pipelines.core.options import ConfigError, declared

__all__ = ["ConfigError", "build_parser", "cli", "load_config"]

C = TypeVar("C")
USER_ERRORS = (UserError, FileNotFoundError)


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` whose ValueError message reaches the user as it is."""

    @functools.wraps(parse)
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, once: not where the help already says its default, nor "None"
    (a required flag, or one whose default the help explains); the exit-status table (the
    epilog) keeps its lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def build_parser(
    config: type, prog: str, description: str, defaults: dict[str, Any] | None = None
) -> argparse.ArgumentParser:
    """The parser of a job whose options are the fields of ``config``, in their groups;
    ``defaults`` (from a config file) replace the declared defaults and satisfy required
    flags."""
    defaults = defaults or {}
    p = argparse.ArgumentParser(
        prog=prog,
        description=description + " Options may also come from --config FILE (YAML, keys "
        "named like the flags); flags override the file.",
        epilog=exit_status_table(),
        formatter_class=_Formatter,
    )
    p.add_argument("--config", help="YAML file of options (flags override it)")
    groups: dict[str | None, Any] = {None: p}
    for d in declared(config):
        where = groups.get(d.option.group) or groups.setdefault(
            d.option.group, p.add_argument_group(d.option.group)
        )
        kw: dict[str, Any] = {"help": d.option.help, "dest": d.name}
        default = defaults.get(d.name, None if d.default is MISSING else d.default)
        if d.default is MISSING and d.name not in defaults:
            kw["required"] = True
        elif d.base is bool:
            plain = d.default is False  # an off switch: --flag; else --flag / --no-flag
            kw["action"] = "store_true" if plain else argparse.BooleanOptionalAction
        if "action" not in kw:  # argparse says "invalid int value" for the plain types itself
            kw["type"] = _typed(d.option.parse) if d.option.parse else d.base
        if d.option.choices is not None:
            kw["choices"] = d.option.choices
        where.add_argument(d.flag, default=default, **kw)
    return p


def read_config_file(config: type, path: str) -> dict[str, Any]:
    """The option values of a YAML config file (keys spelled like the flags or the fields)."""
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: cannot read YAML ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value")
    names = {d.name for d in declared(config)}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ConfigError(f"--config {path}: unknown option {key!r}")
        out[name] = value
    return out


def load_config(config: type[C], argv: list[str] | None, prog: str, description: str) -> C:
    """``config`` from the command line (and ``--config FILE``): parsed, typed and checked."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    defaults = read_config_file(config, known.config) if known.config else {}
    args = vars(build_parser(config, prog, description, defaults).parse_args(argv))
    args.pop("config")
    return config(**args)


def _expected_cause(e: BaseException | None) -> BaseException | None:
    """The expected failure behind ``e``, also when Ray re-raised it from a worker or actor
    (``RayTaskError.cause``, Ray Data's wrappers as ``__cause__``, or only the text of the
    worker's traceback: a Ray Data task's ``UserCodeException`` arrives without its cause);
    None for a bug."""
    outermost, seen = e, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if isinstance(inner, BaseException):
            e = inner
            continue
        if isinstance(e, USER_ERRORS):
            return e
        from_text = _named_in_text(str(e))
        if from_text is not None:
            return from_text
        e = e.__cause__ or e.__context__
    return _named_in_text(str(outermost)) if outermost is not None else None


# How Ray writes a worker's exception into the text of the error it raises instead, for the
# errors that keep only text (an actor whose __init__ failed: ActorDiedError, Ray 2.60).
_RAISED = re.compile(r"^(pipelines(?:\.\w+)+)\.(\w+): (.+)$", re.M)


def _named_in_text(text: str) -> BaseException | None:
    """One of the project's expected failures named in ``text`` as Ray wrote it, rebuilt."""
    for module, name, message in _RAISED.findall(text):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, UserError):
            return cls(message.strip())
    return None


def cli(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Run ``main``; an expected failure prints ``error: ...`` on one line and exits with its
    class's status (:class:`~pipelines.core.errors.Exit`); anything else is a traceback and
    status 1."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        try:
            return main(argv)
        except Exception as e:
            expected = _expected_cause(e)
            if expected is None:
                raise
            print(f"error: {expected}", file=sys.stderr)
            return getattr(expected, "exit_code", Exit.BAD_INPUT)

    return wrapper
