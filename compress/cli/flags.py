"""The command line's flags, generated from the configuration classes: a default and its help are
written once, in the class (its field and its docstring's ``Attributes:`` section), and
:func:`add_flags` / :func:`from_flags` turn the class into flags and the flags back into a
validated instance. The flag groups shared by several commands are defined here too."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, Sequence, Union

from compress.analysis import AnalysisConfig
from compress.config import convert, field_help, init_fields
from compress.data import DataConfig
from compress.errors import OptionError, UserError, shorten
from compress.models import ModelConfig
from compress.training import TrainConfig

__all__ = ["add_flags", "from_flags", "add_model", "add_data", "add_train", "add_analysis", "model_config",
           "data_config", "train_config", "analysis_config"]


_ALIAS = "_alias_"  # namespace entries that point a config field at a flag another config added
_FLAG = "_flag_"  # namespace entries that name the flag of a config field (for error messages)


def _flag_type(tp: Any) -> tuple[Any, dict[str, Any]]:
    """argparse ``type``/``choices``/``nargs`` for an annotation (Optional stripped)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1:
            return _flag_type(arms[0])
        return _yaml_value, {}
    if origin is Literal:
        choices = list(typing.get_args(tp))
        return type(choices[0]), {"choices": choices}
    if origin in (list, tuple):
        inner, _ = _flag_type(typing.get_args(tp)[0])
        return inner, {"nargs": "+"}
    if origin is dict or tp is dict:
        return _yaml_value, {}
    if tp in (int, float, str):
        return tp, {}
    return _yaml_value, {}


def _yaml_value(text: str) -> Any:
    from compress import yamlsafe

    try:
        return yamlsafe.loads(text, "the value")
    except UserError as e:
        raise argparse.ArgumentTypeError(f"{shorten(text)}: {e}") from None


def add_flags(parser: argparse.ArgumentParser | Any, cls: type, *, prefix: str = "",
              rename: Mapping[str, str | Sequence[str]] | None = None, skip: Sequence[str] = (),
              defaults: Mapping[str, Any] | None = None, helps: Mapping[str, str] | None = None) -> None:
    """Add one flag per field of dataclass ``cls`` to ``parser`` (or an argument group).

    The flag is ``--field-name`` (``rename`` maps a field to other option strings, e.g.
    ``{"name": "--data"}``); its default and help come from the class, a boolean becomes
    ``--x/--no-x``. A flag the parser already has (``--seed`` shared by two configs) is not added
    again: both configs read the same value. The flag's ``dest`` is ``prefix`` + the field name
    (read back by :func:`from_flags` with the same ``prefix``).
    """
    rename = dict(rename or {})
    defaults = dict(defaults or {})
    texts = field_help(cls)
    texts.update(helps or {})
    hints = typing.get_type_hints(cls)
    actions = getattr(parser, "_option_string_actions", {})
    for f in init_fields(cls):
        if f.name in skip:
            continue
        names = rename.get(f.name, "--" + f.name.replace("_", "-"))
        names = [names] if isinstance(names, str) else list(names)
        dest = prefix + f.name
        shared = next((actions[n] for n in names if n in actions), None)
        if shared is not None:  # e.g. --seed of training and of the analysis: one flag, both read it
            parser.set_defaults(**{_ALIAS + dest: shared.dest})
            continue
        parser.set_defaults(**{_FLAG + dest: names[0]})
        default = defaults.get(f.name, _default(f))
        text = texts.get(f.name, "")
        shown = "" if default is None or isinstance(default, (dict, list)) and not default else f" (default: {default})"
        tp = hints[f.name]
        if tp is bool:
            parser.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                                help=text + shown)
            continue
        conv, extra = _flag_type(tp)
        if _bool_or_choice(tp):  # e.g. stream: auto | true | false; the bare flag means true
            choices = [a for arm in typing.get_args(tp) if typing.get_origin(arm) is Literal
                       for a in typing.get_args(arm)]
            parser.add_argument(*names, dest=dest, type=conv, default=default, nargs="?", const=True,
                                metavar="{" + ",".join([*map(str, choices), "true", "false"]) + "}",
                                help=text + shown)
            negated = [f"--no-{n[2:]}" for n in names if n.startswith("--") and f"--no-{n[2:]}" not in actions]
            if negated:  # --no-x stays the same as --x false (amp was a plain switch, --amp/--no-amp, before)
                parser.add_argument(*negated, dest=dest, action="store_false", help=argparse.SUPPRESS)
            continue
        metavar = None if "choices" in extra else {int: "N", float: "X"}.get(conv, f.name.upper())
        parser.add_argument(*names, dest=dest, type=conv, default=default, help=text + shown, metavar=metavar,
                            **extra)


def _bool_or_choice(tp: Any) -> bool:
    """Whether ``tp`` is ``bool | Literal[...]`` (a switch with more settings than on and off)."""
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return False
    arms = [a for a in typing.get_args(tp) if a is not type(None)]
    return bool in arms and all(a is bool or typing.get_origin(a) is Literal for a in arms)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def from_flags(cls: type, args: argparse.Namespace, *, prefix: str = "", names: Mapping[str, str] | None = None,
               **fixed: Any) -> Any:
    """Build ``cls`` from the parsed flags that :func:`add_flags` added with ``prefix`` (plus
    ``fixed`` values), with the same checks as a recipe; ``names`` gives the flag of an error key
    that is not a field (``{"options.width": "--width"}``)."""
    data, flags = {}, {}
    for f in init_fields(cls):
        dest = getattr(args, _ALIAS + prefix + f.name, prefix + f.name)
        flags[f.name] = getattr(args, _FLAG + dest, "--" + f.name.replace("_", "-"))
        if hasattr(args, dest):
            data[f.name] = getattr(args, dest)
    data.update(fixed)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():  # argparse typed the values; None stands for "not given" where not allowed
        if value is None and type(None) not in typing.get_args(hints[key]) and hints[key] is not Any:
            continue
        kwargs[key] = convert(value, hints[key], flags.get(key, key))
    flags.update(names or {})
    try:
        return cls(**kwargs)
    except OptionError as e:
        head, _, rest = e.key.partition(".")  # lr_factors.features: the flag, then the entry
        flag = flags.get(e.key) or (f"{flags[head]} {rest}" if rest and head in flags else e.key)
        raise UserError(f"{flag} {e.message}") from None



# the command line's names for fields whose flag is not --<field-name>
_DATA_FLAGS = {"name": "--data", "root": "--data-root", "num_labels": ["--labels"]}
_ANALYSIS_FLAGS = {"plateau_tolerance": ["--tolerance", "--plateau-tolerance"], "batch_size": "--extract-batch-size"}


def add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    add_flags(g, ModelConfig, prefix="model_", rename={"name": "--model"}, skip=["options"], defaults={"name": None},
              helps={"name": "vgg16, vgg6, avgg16, timm:<name> or torchvision:<name> (default: from the checkpoint, "
                             "else vgg16)"})
    g.add_argument("--width", type=float, default=None, help="width multiplier of the own VGGs (e.g. 0.25)")
    g.add_argument("--batch-norm", dest="batch_norm", action=argparse.BooleanOptionalAction, default=None,
                   help="batch-norm after every conv (own VGGs; default on)")
    g.add_argument("--fc-hidden", default=None, help="hidden FC widths before the output layer, e.g. 4096,4096 or none")


def add_data(p: argparse.ArgumentParser) -> None:
    add_flags(p.add_argument_group("data"), DataConfig, prefix="data_", rename=_DATA_FLAGS)


def add_train(p: argparse.ArgumentParser) -> None:
    add_flags(p.add_argument_group("optimisation (SGD, Nesterov momentum, L2)"), TrainConfig,
              skip=["distill"])  # training from scratch has no teacher


def add_analysis(p: argparse.ArgumentParser) -> None:
    add_flags(p.add_argument_group("analysis"), AnalysisConfig, prefix="analysis_", rename=_ANALYSIS_FLAGS)


def model_options(args: argparse.Namespace) -> dict:
    """The architecture options of the own VGGs given as flags."""
    opts = {}
    if args.width is not None:
        opts["width"] = args.width
    if args.batch_norm is not None:
        opts["batch_norm"] = args.batch_norm
    if args.fc_hidden is not None:
        text = args.fc_hidden.strip().lower()
        try:
            opts["fc_hidden"] = [] if text in ("", "none") else [int(v) for v in text.split(",")]
        except ValueError:
            raise UserError(f"--fc-hidden {shorten(args.fc_hidden)}: expected comma-separated integers, e.g. "
                            f"4096,4096, or 'none'") from None
        if any(v < 1 for v in opts["fc_hidden"]):
            raise UserError(f"--fc-hidden {shorten(args.fc_hidden)}: every hidden width must be a positive integer, "
                            f"e.g. 4096,4096, or 'none' for no hidden layer")
    return opts


_OPTION_FLAGS = {"options.width": "--width", "options.batch_norm": "--batch-norm", "options.fc_hidden": "--fc-hidden"}


def model_config(args: argparse.Namespace, default_name: str = "") -> ModelConfig:
    """The model of the flags; an empty name means "from the checkpoint" (see
    :func:`compress.jobs.config_from_checkpoint`)."""
    name = args.model_name or ("" if args.model_checkpoint else default_name or "vgg16")
    return from_flags(ModelConfig, args, prefix="model_", names=_OPTION_FLAGS, name=name, options=model_options(args))


def data_config(args: argparse.Namespace) -> DataConfig:
    return from_flags(DataConfig, args, prefix="data_")


def train_config(args: argparse.Namespace) -> TrainConfig:
    return from_flags(TrainConfig, args)


def analysis_config(args: argparse.Namespace) -> AnalysisConfig:
    return from_flags(AnalysisConfig, args, prefix="analysis_")
