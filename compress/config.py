"""Configurations as frozen dataclasses: built from YAML mappings and from command-line flags.

Every setting of the toolkit is a field of one frozen dataclass owned by the code that uses it
(:class:`compress.training.TrainConfig`, :class:`compress.analysis.AnalysisConfig`,
:class:`compress.data.DataConfig`, :class:`compress.models.ModelConfig`, and one class per recipe
step). Its default and its help text are written once, in the class: the default on the field,
the help in the class docstring's ``Attributes:`` section (:func:`field_help`). This module turns
such a class into a validated instance from a mapping (:func:`from_dict`, used by recipes); the
command line generates its flags from the same classes (:mod:`compress.cli.flags`), so the
defaults never drift.

It imports nothing from the rest of the package but :mod:`compress.errors`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from typing import Any, Literal, Sequence, Union

from compress.errors import OptionError, UserError, clip, shorten, unknown_name

__all__ = ["from_dict", "to_dict", "convert", "type_name", "field_help", "init_fields"]


# ---------------------------------------------------------------- typed loading


def type_name(tp: Any) -> str:
    """A readable name of a type annotation (``int or 'auto'``, ``list of str``)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (and build nested dataclasses).

    Raises:
        UserError: naming ``where`` (the key path), the value and the expected type.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own error is the precise one
            return convert(value, arms[0], where)
        for arg in arms:
            try:
                return convert(value, arg, where)
            except UserError:
                pass
        raise UserError(f"{where}: expected {type_name(tp)}, got {shorten(value)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise UserError(f"{where}: expected {type_name(tp)}, got {shorten(value)}")
    if tp is type(None):
        if value is None:
            return None
        raise UserError(f"{where}: expected null, got {shorten(value)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected {type_name(tp)}, got {shorten(value)}")
        (arg,) = typing.get_args(tp)[:1]
        items = [convert(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {shorten(value)}")
        args = typing.get_args(tp)
        if len(args) == 2:
            return {convert(k, args[0], f"{where} key"): convert(v, args[1], f"{where}.{shorten(k, 60)}")
                    for k, v in value.items()}
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise UserError(f"{where} {shorten(value)}: must be a finite number (not NaN or infinite)")
            return number
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    raise UserError(f"{where}: expected {type_name(tp)}, got {shorten(value)}")


def init_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` that its constructor takes."""
    return [f for f in dataclasses.fields(cls) if f.init]


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types.

    Args:
        cls: a dataclass whose annotations say what each key accepts.
        data: the mapping (``None`` means every default).
        where: the key path named in errors (``recipe.steps[2].dilute``).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {shorten(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in init_fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise unknown_name(f"key in {where}", str(key), names)
        kwargs[key] = convert(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except OptionError as e:
        raise UserError(f"{where}.{e.key}: {e.message}") from None
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {clip(str(e), 300)}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass (nested ones included) as plain JSON/YAML values: tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in init_fields(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------- help text from the docstring

_ATTR_LINE = re.compile(r"^(\s*)([A-Za-z_][\w, ]*):\s*(.*)$")


def field_help(cls: type) -> dict[str, str]:
    """Help text per field, read from the ``Attributes:`` section of the class docstrings (the
    class's own and its bases'); a line ``a, b: text`` documents both fields."""
    helps: dict[str, str] = {}
    for klass in reversed(inspect.getmro(cls)):
        doc = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        lines = doc.splitlines()
        try:
            start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:") + 1
        except StopIteration:
            continue
        names: list[str] = []
        indent = None
        for line in lines[start:]:
            if not line.strip():
                continue
            m = _ATTR_LINE.match(line)
            depth = len(line) - len(line.lstrip())
            if indent is None:
                indent = depth
            if depth < indent:
                break
            if m and depth == indent:
                names = [n.strip() for n in m.group(2).split(",")]
                for n in names:
                    helps[n] = m.group(3).strip()
            elif names:
                for n in names:
                    helps[n] = (helps[n] + " " + line.strip()).strip()
    return helps
