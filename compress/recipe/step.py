"""What a recipe step is: one frozen dataclass, registered under its YAML name, whose fields are
the step's options, with a load-time ``check`` and the ``run`` that does the work.

A new step is one file::

    @register_step("halve")
    @dataclass(frozen=True)
    class Halve(Step):
        \"\"\"Halve the filters of one conv layer.

        Attributes:
            layer: module path of the conv layer.
        \"\"\"

        layer: str = "features.conv1"

        def check(self, ctx: CheckContext) -> None:
            ctx.require_modules("layer", [self.layer])

        def run(self, state, folder):
            ...  # change state.model
            return {"filters_left": ...}

Its fields are validated when the recipe is loaded (unknown key, wrong type), ``check`` runs on a
weightless copy of the model before anything is built or trained, and ``run`` gets the
:class:`~compress.recipe.state.RunState` (the current model, data, analysis) and the step's own
folder. ``changes_model`` tells the runner to measure and save the model after the step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch.nn as nn

from compress.errors import UserError
from compress.models.introspect import match_modules

if TYPE_CHECKING:
    from compress.recipe.state import RunState

__all__ = ["Step", "CheckContext", "register_step", "get_step", "list_steps"]


class Step:
    """Base of every recipe step (subclass it as a frozen dataclass and register it).

    Class attributes:
        name: the step's YAML name (set by :func:`register_step`).
        changes_model: the step changes the model's structure or weights; the runner then
            measures it, saves it to the step's folder, and no later export or bench can miss it.
        all_ranks: under ``torchrun`` with several processes, every process runs the step
            together (it fine-tunes: :func:`~compress.training.fit` and the evaluations inside
            need every process), and its work that is not fine-tuning goes through
            :meth:`~compress.recipe.state.RunState.on_main`. False (the default, and what a
            plug-in gets): rank 0 runs it alone, as a single process would, while the others
            wait and then adopt its model and state; only rank 0 writes files in any case.
    """

    name: ClassVar[str] = ""
    changes_model: ClassVar[bool] = True
    all_ranks: ClassVar[bool] = False

    def check(self, ctx: CheckContext) -> None:
        """Load-time checks against a weightless copy of the model (taps, layers, targets).

        Raises:
            UserError: naming ``ctx.where`` and the option at fault.
        """

    def run(self, state: RunState, folder: Path) -> dict[str, Any]:
        """Carry out the step on ``state`` (its model is changed in place); return what the run
        report shows (JSON-able)."""
        raise NotImplementedError


@dataclass
class CheckContext:
    """What a step's ``check`` sees: the recipe, a weightless ('meta' device) model, where the
    step sits, and the names of the steps before it."""

    recipe: Any
    model: nn.Module
    input_size: tuple[int, int, int]
    index: int
    where: str
    previous: Sequence[Step] = ()

    def require_modules(self, option: str, names: Sequence[str]) -> list[str]:
        """Module paths matched by ``names`` (paths or globs); an error naming the option if one
        matches nothing."""
        try:
            return match_modules(self.model, names, f"tap or layer of {self.recipe.model.name}")
        except UserError as e:
            raise UserError(f"{self.where}.{option}: {e}") from None

    def fail(self, option: str, message: str) -> UserError:
        """A :class:`UserError` that names this step's ``option``: ``<where>.<option> <message>``."""
        return UserError(f"{self.where}.{option} {message}")


_STEPS: dict[str, type[Step]] = {}


def register_step(name: str):
    """Register a step class under its YAML ``name``.

    Raises:
        TypeError: the class is not a frozen dataclass subclassing :class:`Step`, or has no ``run``.
        ValueError: ``name`` is already registered.
    """

    def deco(cls: type[Step]) -> type[Step]:
        label = f"step {name!r} ({cls.__module__}.{cls.__qualname__})"
        if not (isinstance(cls, type) and issubclass(cls, Step)):
            raise TypeError(f"{label} must subclass compress.recipe.Step")
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{label} must be a frozen dataclass (@dataclass(frozen=True)): its fields are its options")
        if cls.run is Step.run:
            raise TypeError(f"{label} defines no run(state, folder); a step without work cannot be registered")
        if name in _STEPS:
            raise ValueError(f"step {name!r} is already registered by {_STEPS[name].__module__}."
                             f"{_STEPS[name].__qualname__}")
        cls.name = name
        _STEPS[name] = cls
        return cls

    return deco


def list_steps() -> dict[str, type[Step]]:
    """Every registered step class by name (the built-in ones are registered when
    :mod:`compress.recipe.steps` is imported, as the recipe loader does)."""
    return dict(sorted(_STEPS.items()))


def get_step(name: str) -> type[Step] | None:
    """The step class registered under ``name``, or ``None``."""
    return _STEPS.get(name)
