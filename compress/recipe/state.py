"""What the steps of a run share: the current model, its data and analysis, the masks to keep
during fine-tuning, and the files the run has produced so far.

Under ``torchrun`` every process holds a :class:`RunState` of its own, kept equal: a step's work
that is not fine-tuning runs on rank 0 alone (:meth:`RunState.on_main`) and the others adopt
rank 0's model (rebuilt from its bytes), masks and analysis afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.nn as nn

from compress import distributed
from compress.analysis import AnalysisConfig, AnalysisResult, analyze_model
from compress.compression.serialize import load_shared, model_bytes, model_from_bytes, save_model
from compress.data import DataBundle
from compress.errors import UserError, unknown_name
from compress.models.introspect import count_flops, count_nonzero, count_params
from compress.training import evaluate

__all__ = ["RunState", "measure"]

T = TypeVar("T")


def measure(model: nn.Module, bundle: DataBundle) -> dict[str, float]:
    """Parameters (dense and non-zero), FLOPs (fvcore) and the accuracy on ``bundle.test`` (the
    validation split for a bundle from :meth:`~compress.data.DataBundle.for_choices`) of ``model``;
    ``split`` says which split the accuracy is from."""
    return {"params": count_params(model), "nonzero_params": count_nonzero(model),
            "flops": count_flops(model, bundle.input_size), "accuracy": evaluate(model, bundle),
            "split": bundle.eval_split}


@dataclass
class RunState:
    """The state a recipe's steps read and change.

    Attributes:
        recipe: the recipe being run.
        model: the current model (steps change it in place or replace it).
        bundle: the data every choice is made on: its ``test`` is the validation split (see
            :meth:`~compress.data.DataBundle.for_choices`), or the test split when the recipe says
            ``analysis.split: test``. Steps evaluate, analyse and fine-tune on this.
        report_data: the data with its real test split, used only to report the original and the
            final model (and by ``bench``).
        meta: the metadata every saved model carries (labels, input size, normalisation).
        analysis: the analysis of the original model, per tap; kept current by :meth:`tap_analysis`.
        out: the run folder.
        progress: show progress bars.
        masks: AFCC masks re-applied after every fine-tuning step, by module path.
        stale: taps whose analysis no longer matches the model (an earlier step changed them).
        artifacts: files the run wrote, by name (``original``, ``NN-<step>``, ``final``, ``onnx``, ...).
        models: model files a ``bench`` step can compare, by name (``original``, ``NN-<step>``,
            the step name for its latest model, ``final``); ``.pt`` or ``.onnx``.
        resume: continue the fine-tuning checkpoints an earlier run of the same recipe left
            (``compress run --no-resume``: start them again).
    """

    recipe: Any
    model: nn.Module
    bundle: DataBundle
    meta: dict[str, Any]
    analysis: AnalysisResult
    out: Path
    progress: bool = True
    report_data: DataBundle | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    stale: set[str] = field(default_factory=set)
    artifacts: dict[str, str] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    resume: bool = True
    _teacher: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def analysis_config(self) -> AnalysisConfig:
        return self.recipe.analysis

    def resolve_tap(self, tap: str) -> str:
        """A tap name, with ``plateau`` and ``last`` replaced by the analysed tap they stand for."""
        names = [t.name for t in self.analysis.taps]
        if tap == "plateau":
            return self.analysis.plateau
        if tap == "last":
            return names[-1]
        if tap not in names:
            raise unknown_name("analysed tap", tap, names + ["plateau", "last"])
        return tap

    def tap_analysis(self, tap: str):
        """The analysis of ``tap``, re-run for that tap alone when an earlier step changed its filters."""
        if tap in self.stale:
            fresh = analyze_model(self.model, self.bundle, [tap], self.analysis_config, progress=self.progress)
            self.analysis.taps = [fresh.taps[0] if t.name == tap else t for t in self.analysis.taps]
            self.stale.discard(tap)
        return self.analysis.tap(tap)

    def teacher(self) -> nn.Module:
        """The teacher of distillation: the run's original model (``models["original"]``), loaded
        once and kept in memory, in eval mode, on the device of the current model, without
        gradients. Loading it leaves the random-number state as it was.

        Raises:
            UserError: the run has no original model file.
        """
        if self._teacher is None:
            path = self.models.get("original")
            if path is None:
                raise UserError("distill: the run has no original model to distil from (models['original'] is unset)")
            device = next(self.model.parameters()).device
            with torch.random.fork_rng(devices=[]):  # building the model draws initial weights
                teacher = load_shared(path, device=device).eval()  # under torchrun: rank 0's file, sent
            for p in teacher.parameters():
                p.requires_grad_(False)
            self._teacher = teacher
        return self._teacher

    def keeper(self) -> Callable[[nn.Module], None] | None:
        """A callable that re-applies the AFCC masks after every optimiser step (``None``: no masks)."""
        if not self.masks:
            return None
        from compress.compression.afcc import MaskKeeper

        return MaskKeeper(self.masks)

    def on_main(self, fn: Callable[[], T], *, model: bool = True) -> T:
        """``fn()``, which changes this state (the model, masks, analysis, artifacts), on rank 0
        alone under ``torchrun`` (as a single process would run it: see
        :func:`compress.distributed.run_on_main`); then every process adopts rank 0's state: its
        model rebuilt from its bytes (on rank 0 too, so that all hold the same modules, parameters
        in the same order), masks, analysis, artifacts and model files. Every process must call
        it at the same point. In a single process, simply ``fn()``.

        Args:
            model: ``fn`` may change the model (``False``: it only measures or writes files, and
                the model is not sent).

        Returns:
            ``fn()``'s result on rank 0 (picklable), on every process.
        """
        if not distributed.is_distributed():
            return fn()
        before = list(self.analysis.taps)  # held, so that the ids of the taps fn leaves alone stay theirs

        def work() -> tuple[T, dict[str, Any]]:
            result = fn()
            return result, self._snapshot({id(t) for t in before}, model)

        result, snapshot = distributed.run_on_main(work)
        self._adopt(snapshot)
        return result

    def share(self) -> None:
        """Give every process rank 0's model and state (e.g. after fine-tuning on all of them,
        which leaves each its own batch-norm statistics); a no-op in a single process."""
        if distributed.is_distributed():
            self.on_main(lambda: None)

    def _snapshot(self, unchanged: set[int], with_model: bool) -> dict[str, Any]:
        """What :meth:`on_main` sends: the model's bytes, and the analysis of the taps ``fn`` replaced."""
        return {"model": model_bytes(self.model, self.meta) if with_model else None,
                "masks": {k: torch.as_tensor(v).cpu() for k, v in self.masks.items()},
                "stale": set(self.stale), "plateau": self.analysis.plateau,
                "taps": [t.name if id(t) in unchanged else t for t in self.analysis.taps],
                "artifacts": dict(self.artifacts), "models": dict(self.models)}

    def _adopt(self, snapshot: dict[str, Any]) -> None:
        device = next(self.model.parameters()).device
        if snapshot["model"] is not None:
            self.model = model_from_bytes(snapshot["model"], device, "the model from rank 0")[0]
        if distributed.is_main():
            return
        mine = {t.name: t for t in self.analysis.taps}
        self.analysis.taps = [mine[t] if isinstance(t, str) else t for t in snapshot["taps"]]
        self.analysis.plateau = snapshot["plateau"]
        self.masks = {k: v.to(device) for k, v in snapshot["masks"].items()}
        self.stale = set(snapshot["stale"])
        self.artifacts, self.models = dict(snapshot["artifacts"]), dict(snapshot["models"])

    def save_current(self, path: Path) -> Path:
        """Save the current model with the run's metadata (the transforms it carries included)."""
        return save_model(self.model, path, self.meta)
