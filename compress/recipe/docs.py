"""The reference of every recipe step, generated from the step classes (their fields, defaults
and docstrings), so the README's step table and the code cannot drift (a test compares them)."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing

from compress.config import field_help, init_fields, to_dict, type_name
from compress.recipe import steps as _builtin  # noqa: F401  (registers the built-in steps)
from compress.recipe.step import list_steps

__all__ = ["steps_markdown"]


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if dataclasses.is_dataclass(value):  # a nested step's options: show what differs from its own defaults
        own = to_dict(type(value)())
        changed = {k: v for k, v in to_dict(value).items() if own[k] != v}
        return (str(changed).replace("'", "") + ", the rest as in " + (type(value).name or "its class")) if changed \
            else "as in " + (type(value).name or "its class")
    value = to_dict(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value).replace("'", "")


def _type(tp) -> str:
    if dataclasses.is_dataclass(tp):  # a step's options, or a nested section (listed by its keys)
        name = getattr(tp, "name", "")
        return f"mapping: the {name} options" if name else f"mapping ({', '.join(f.name for f in init_fields(tp))})"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if any(dataclasses.is_dataclass(a) for a in args):
            return " or ".join(_type(a) for a in args)
    return type_name(tp).replace("|", "/")


def _summary(cls: type) -> str:
    doc = inspect.cleandoc(cls.__doc__ or "")
    return " ".join(doc.split("\n\n")[0].split())


def steps_markdown(*, builtin_only: bool = False) -> str:
    """One Markdown section per registered step: what it does and a table of its options.

    Args:
        builtin_only: leave out steps registered outside this package (plug-ins).
    """
    lines = []
    for name, cls in list_steps().items():
        if builtin_only and not cls.__module__.startswith("compress."):
            continue
        hints = typing.get_type_hints(cls)
        helps = field_help(cls)
        kind = "changes the model" if cls.changes_model else "measures or writes files; the model is unchanged"
        lines += [f"#### `{name}`", "", f"{_summary(cls)} ({kind})", "",
                  "| option | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in init_fields(cls):
            text = helps.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | {_type(hints[f.name])} | `{_default(f)}` | {text} |")
        lines.append("")
    return "\n".join(lines)
