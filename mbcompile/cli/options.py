"""Command-line flags made from the typed option objects, and the dataclasses the CLI parses into.

``add_option_flags`` adds one flag per field of :class:`~mbcompile.options.CompileOptions`
(``seq_len`` → ``--seq-len``, its help from the field), so the CLI's ``compile`` and ``tune``
take exactly the options the API takes; ``options_from_args`` builds the object back.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

from mbcompile.errors import OptionError
from mbcompile.options import CompileOptions

T = TypeVar("T")

# How a field's value is read from the command line, where its Python type is not a plain one.
def _passes(text: str) -> str | list[str]:
    if text in ("default", "none"):
        return "default" if text == "default" else []
    return [p.strip() for p in text.split(",") if p.strip()]


_PARSERS = {"passes": _passes}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(field: dataclasses.Field) -> Any:
    if field.name in _PARSERS:
        return _PARSERS[field.name]
    default = field.default
    annotation = str(field.type)
    if isinstance(default, bool):
        return None
    if annotation.startswith("int") or isinstance(default, int):
        return int
    return str


def positive_int(text: str) -> int:
    """An argparse type: a whole number ≥ 1 (argparse reports anything else as a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {value}")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535, got {value}")
    return value


# Flags that apply with --logits-for masked only: not given (None) unless the user gives them,
# so that giving one without it is refused instead of ignored.
MASKED_ONLY = ("max_masked", "mask_token_id")


def add_option_flags(parser: argparse.ArgumentParser, cls: type = CompileOptions) -> None:
    """One flag per field of the options dataclass ``cls``."""
    for field in dataclasses.fields(cls):
        meta = field.metadata
        default = None if field.name in MASKED_ONLY else field.default
        kwargs: dict[str, Any] = {"default": default, "help": meta.get("help")}
        if "choices" in meta:
            kwargs["choices"] = list(meta["choices"])
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        value_type = _value_type(field)
        if value_type is not None:
            kwargs["type"] = value_type
        parser.add_argument(_flag(field.name), dest=field.name, **kwargs)


def options_from_args(ns: argparse.Namespace, cls: type = CompileOptions):
    """The options object from parsed flags (``add_option_flags``' fields); OptionError for a
    ``MASKED_ONLY`` flag given without ``--logits-for masked``."""
    given = [_flag(name) for name in MASKED_ONLY if getattr(ns, name, None) is not None]
    if given and getattr(ns, "logits_for", None) != "masked":
        raise OptionError(f"{' and '.join(given)} apply with --logits-for masked only")
    values = {}
    for field in dataclasses.fields(cls):
        value = getattr(ns, field.name)
        values[field.name] = field.default if value is None and field.name in MASKED_ONLY else value
    return cls(**values)


def parsed(cls: type[T], ns: argparse.Namespace, **extra: Any) -> T:
    """A command's argument dataclass from the namespace: each field by name (``extra`` first)."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in extra:
            values[field.name] = extra[field.name]
        elif hasattr(ns, field.name):
            values[field.name] = getattr(ns, field.name)
    return cls(**values)
