"""End-to-end jobs behind the commands: train a model, analyse it, write the run folder and report."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from compress._version import __version__
from compress.analysis import AnalysisConfig, AnalysisResult, analyze_model
from compress.data import DataBundle, load_data
from compress.errors import UserError
from compress.io import atomic_write_text, ensure_writable_dir
from compress.models import create_model, resolve_taps
from compress.models.serialize import save_model
from compress.training import TrainConfig, default_device, evaluate, fit, read_meta

__all__ = ["ModelSpec", "DataSpec", "build_model", "model_meta", "train", "analyze"]


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build: a factory name and its options."""

    name: str = "vgg16"
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    pretrained: bool = False
    checkpoint_skip: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataSpec:
    """Which data to load (see :func:`compress.data.load_data`)."""

    name: str = "digits"
    root: str | None = None
    download: bool = False
    num_labels: int | None = None
    label_seed: int = 0
    image_size: int | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None

    def load(self) -> DataBundle:
        return load_data(self.name, root=self.root, download=self.download, num_labels=self.num_labels,
                         label_seed=self.label_seed, image_size=self.image_size, limit_train=self.limit_train,
                         limit_test=self.limit_test, mean=self.mean, std=self.std)


def environment() -> dict[str, str]:
    """Versions and hardware, written beside every result."""
    return {"compress": __version__, "torch": str(torch.__version__), "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "threads": str(torch.get_num_threads()),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def _write_config(folder: Path, **sections: Any) -> None:
    doc = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in sections.items()}
    doc["environment"] = environment()
    atomic_write_text(folder / "config.yaml", yaml.safe_dump(doc, sort_keys=False))


def model_meta(spec: ModelSpec, bundle: DataBundle) -> dict[str, Any]:
    """What a saved model carries besides its weights (see :mod:`compress.models.serialize`)."""
    return {"model": spec.name, "options": dict(spec.options), "num_classes": bundle.num_classes,
            "input_size": list(bundle.input_size), "label_names": list(bundle.label_names),
            "mean": list(bundle.mean), "std": list(bundle.std), "channel_order": "RGB", "dataset": bundle.name}


def build_model(spec: ModelSpec, bundle: DataBundle, device: torch.device | None = None) -> torch.nn.Module:
    """The model of ``spec`` sized for ``bundle`` (classes, channels, resolution), with its checkpoint."""
    c, h, _ = bundle.input_size
    model = create_model(spec.name, num_classes=bundle.num_classes, in_chans=c, img_size=h,
                         pretrained=spec.pretrained, checkpoint=spec.checkpoint,
                         checkpoint_skip=spec.checkpoint_skip, **spec.options)
    return model.to(device or default_device())


def spec_from_checkpoint(spec: ModelSpec) -> ModelSpec:
    """Fill the model name and options from the checkpoint's metadata when the spec leaves them out."""
    if spec.checkpoint is None:
        return spec if spec.name else ModelSpec("vgg16", spec.options, None, spec.pretrained)
    if not Path(spec.checkpoint).is_file():
        raise UserError(f"checkpoint {spec.checkpoint!r} does not exist")
    meta = read_meta(spec.checkpoint)
    name = spec.name or meta.get("model") or "vgg16"
    options = spec.options or (meta.get("options", {}) if name == meta.get("model") else {})
    return ModelSpec(name, options, spec.checkpoint, spec.pretrained, spec.checkpoint_skip)


def train(model_spec: ModelSpec, data_spec: DataSpec, cfg: TrainConfig, out: str | Path, *,
          resume: bool = True, progress: bool = True) -> tuple[torch.nn.Module, list[dict[str, float]], DataBundle]:
    """Phase 1: train a model and leave ``checkpoint.pt``, ``model.pt``, ``history.json`` and
    ``config.yaml`` in ``out``."""
    out = ensure_writable_dir(out)
    bundle = data_spec.load()
    torch.manual_seed(cfg.seed)  # the initial weights follow the seed too
    model = build_model(model_spec, bundle)
    _write_config(out, model=model_spec, data=data_spec, train=cfg)
    meta = model_meta(model_spec, bundle)
    history = fit(model, bundle, cfg, out, meta=meta, resume=resume, progress=progress)
    save_model(model, out / "model.pt", meta)
    return model, history, bundle


def analyze(model_spec: ModelSpec, data_spec: DataSpec, cfg: AnalysisConfig, out: str | Path, *,
            taps: list[str] | None = None, model: torch.nn.Module | None = None, bundle: DataBundle | None = None,
            progress: bool = True, report: bool = True) -> AnalysisResult:
    """Phases 2 and 3: probe every tap, analyse every filter, write the artifact and the report.

    Args:
        model_spec: the model (with its checkpoint) to analyse; ignored when ``model`` is given.
        data_spec: the data.
        cfg: analysis settings.
        out: the run folder.
        taps: module paths or globs (default: the model's declared taps).
        model: an already built model.
        bundle: already loaded data.
        progress: progress bars.
        report: also write ``report.md`` and ``report.html``.
    """
    out = ensure_writable_dir(out)
    bundle = bundle or data_spec.load()
    if model is None:
        model_spec = spec_from_checkpoint(model_spec)
        if model_spec.checkpoint is None and not model_spec.pretrained:
            raise UserError("analyze needs a trained model: pass --checkpoint (or --pretrained for timm/torchvision)")
        model = build_model(model_spec, bundle)
    tap_names = resolve_taps(model, taps, bundle.input_size)
    _write_config(out, model=model_spec, data=data_spec, analysis=cfg, taps=tap_names)
    model_acc = evaluate(model, bundle)
    result = analyze_model(model, bundle, tap_names, cfg, model_name=model_spec.name, progress=progress)
    result.model_accuracy = model_acc
    result.config = {"model": asdict(model_spec), "data": asdict(data_spec), "analysis": asdict(cfg)}
    result.save(out)
    if report:
        from compress.report import write_report

        write_report(result, out)
    return result
