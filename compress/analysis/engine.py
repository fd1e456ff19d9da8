"""Phases 2 and 3 on a trained model: one feature pass, one probe per tap, every filter's matrices."""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn as nn
from compress.progress import tqdm

from compress import checks, distributed
from compress.analysis.clusters import CHUNK_BYTES
from compress.analysis.fields import (AUTO_MAX_LABELS, class_sums, decision_filters, decision_matrices, label_images,
                                      label_means, scan_fields)
from compress.analysis.result import AnalysisResult, TapAnalysis
from compress.analysis.stats import find_plateau, layer_stats, snr_estimates
from compress.data import DataBundle
from compress.errors import OptionError, UserError
from compress.analysis.features import FeatureCache, extract_features
from compress.analysis.presets import PROBE_PRESETS, PUBLIC_CODE, PresetName
from compress.analysis.probes import LinearProbe

__all__ = ["AnalysisConfig", "analyze_model", "analyze_tap"]

MAX_PROBE_AUGMENT = 100  # augmented copies per training image: each is one more feature pass and cache


@dataclass(frozen=True)
class AnalysisConfig:
    """Settings of phases 2 and 3 (probe defaults from the method's public implementation).

    The probe's optimiser values left unset come from ``probe_preset`` when one is named, else
    from the public code (:data:`compress.analysis.presets.PUBLIC_CODE`); once built, every probe
    field holds the value in force (so the recorded ``config.yaml`` lists them all).

    Attributes:
        taps: module paths or globs to analyse (default: the model's stage ends and final feature layer).
        split: where probe accuracies, the plateau and the field matrices are measured: val (the
            validation split, so choices made from them are not made on the test split) or test (the papers' setting).
        threshold: clipping threshold of the normalised field matrices, in (0, 1).
        probe_preset: a published probe setting that sets the probe values below: public-code, tzach-vgg16,
            tzach-vgg6, tzach-avgg16 (first paper), meir-cifar100, meir-cifar-k, meir-efficientnet (second paper);
            a probe value given explicitly overrides the preset's (default: none, the public code's values).
        probe_epochs: training epochs of each linear probe (default 200).
        probe_batch_size: images per probe step (default: the preset's, else 100).
        probe_lr: probe learning rate (default: the preset's, else 0.01).
        probe_momentum: probe SGD Nesterov momentum (default: the preset's, else 0.975).
        probe_weight_decay: probe L2 weight decay (default: the preset's, else 1e-3).
        probe_lr_decay: q, the factor on the probe learning rate every probe_lr_step epochs (default: the
            preset's, else 0.975).
        probe_lr_step: dt, probe epochs between two decays of the learning rate (default: the preset's, else 1).
        probe_augment: N augmented copies of every training image (random flip and translation up to 4 pixels,
            as training augments; seeded by seed) whose features are cached beside the plain ones, at the cost of
            N more feature passes; each probe epoch then takes, for every image, one of its 1+N versions at random.
            The papers' probes saw augmented images; 0 trains on the plain images' features only (the validation
            and test features, and phase 3, always use the plain images).
        plateau_tolerance: accuracy points below the reference (plateau_reference) still counted as the plateau.
        plateau_reference: what the plateau tolerance is measured from: best_probe (the best probe's accuracy)
            or model (the whole model's accuracy on the same split, as the first paper compares; when no probe
            comes within the tolerance of it, the best probe's).
        feature_dtype: precision of the cached tap features.
        max_memory_gb: memory budget: caches above half of it go to memory-mapped files; phase 3 chunks filters within it.
        cache_dir: folder for those files (default: a temporary folder).
        batch_size: images per forward pass during feature extraction.
        tap_pool: average-pool each tap KxK, stride K, before its probe (the paper used 7 at 224x224).
        seed: probe initialisation and shuffling, and the probe_augment copies.
        decision: Fig. 3B decision matrices: all, none, sample:N (N filters, most clustered first) or auto (all if K <= 100).
        save_fields: raw and normalised fields in the artifact: float32, float16, none or auto (float32 if K <= 100).
    """

    taps: list[str] | None = None
    split: Literal["val", "test"] = "val"
    threshold: float = 0.3
    probe_preset: PresetName | None = None
    probe_epochs: int | None = None
    probe_batch_size: int | None = None
    probe_lr: float | None = None
    probe_momentum: float | None = None
    probe_weight_decay: float | None = None
    probe_lr_decay: float | None = None
    probe_lr_step: int | None = None
    probe_augment: int = 0
    plateau_tolerance: float = 0.5
    plateau_reference: Literal["best_probe", "model"] = "best_probe"
    feature_dtype: Literal["float32", "float16"] = "float32"
    max_memory_gb: float = 4.0
    cache_dir: str | None = None
    batch_size: int = 100
    tap_pool: int | None = None
    seed: int = 0
    decision: str = "auto"
    save_fields: Literal["auto", "float32", "float16", "none"] = "auto"

    def __post_init__(self) -> None:
        self._resolve_probe()
        if not re.fullmatch(r"auto|all|none|sample:[1-9][0-9]*", str(self.decision)):
            raise OptionError("decision", f"must be auto, all, none or sample:N with N >= 1, got {self.decision!r}")
        if not 0.0 < self.threshold < 1.0:
            raise OptionError("threshold", f"{self.threshold} is outside (0, 1); the papers use 0.3 (robust in 0.3-0.6)")
        checks.integer("probe_epochs", self.probe_epochs, low=1, hint="training epochs of each probe, e.g. 200")
        checks.integer("probe_batch_size", self.probe_batch_size, low=1, hint="images per probe step, e.g. 100")
        checks.number("probe_lr", self.probe_lr, low=0, high=1000, low_open=True, hint="e.g. 0.01")
        checks.number("probe_momentum", self.probe_momentum, low=0, high=1, high_open=True, hint="in [0, 1), e.g. 0.975")
        checks.number("probe_weight_decay", self.probe_weight_decay, low=0, high=1, hint="in [0, 1], e.g. 1e-3")
        checks.number("probe_lr_decay", self.probe_lr_decay, low=0, high=1, low_open=True, hint="in (0, 1], e.g. 0.975")
        checks.integer("probe_lr_step", self.probe_lr_step, low=1, hint="epochs between two decays, e.g. 1 or 20")
        checks.integer("probe_augment", self.probe_augment, low=0, high=MAX_PROBE_AUGMENT,
                       hint="augmented copies of every training image, e.g. 0 (none) or 4")
        if self.plateau_reference not in ("best_probe", "model"):
            raise OptionError("plateau_reference", f"{self.plateau_reference!r}: must be best_probe or model")
        checks.number("plateau_tolerance", self.plateau_tolerance, low=0, high=100, hint="accuracy points, e.g. 0.5")
        checks.number("max_memory_gb", self.max_memory_gb, low=0, high=1e6, low_open=True, hint="GiB, e.g. 4")
        checks.integer("batch_size", self.batch_size, low=1, hint="images per forward pass, e.g. 100")
        if self.tap_pool is not None:
            checks.integer("tap_pool", self.tap_pool, low=1, hint="a pooling kernel of at least 1 (or leave it out)")
        checks.seed("seed", self.seed)
        if self.taps is not None and (not self.taps or not all(isinstance(t, str) and t for t in self.taps)):
            raise OptionError("taps", "must be a non-empty list of module paths or globs (or left out: the model's own)")

    def _resolve_probe(self) -> None:
        """Fill every unset probe field from the preset, then from the public code's values."""
        if self.probe_preset is not None and self.probe_preset not in PROBE_PRESETS:
            raise OptionError("probe_preset", f"{self.probe_preset!r} is not a probe preset; choose one of "
                                              f"{', '.join(PROBE_PRESETS)}")
        preset = PROBE_PRESETS[self.probe_preset].values if self.probe_preset else {}
        for key, default in PUBLIC_CODE.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, preset.get(key, default))

    def make_probe(self, num_classes: int) -> LinearProbe:
        return LinearProbe(num_classes, epochs=self.probe_epochs, batch_size=self.probe_batch_size, lr=self.probe_lr,
                           momentum=self.probe_momentum, weight_decay=self.probe_weight_decay,
                           lr_decay=self.probe_lr_decay, lr_step=self.probe_lr_step, seed=self.seed)


def analyze_tap(name: str, weight: torch.Tensor, test: FeatureCache, num_classes: int, threshold: float,
                accuracy: float = float("nan"), train_accuracy: float = float("nan"), *,
                cfg: AnalysisConfig | None = None) -> TapAnalysis:
    """Phase 3 for one tap: field and decision matrices, clipping, clusters, noise, statistics, SNR.

    The features are summed per true label once and divided by the label's number of images
    (:func:`~compress.analysis.fields.label_means`: the field matrices are per-label means, and on
    a balanced set the clusters and noise are bit for bit those of the sums); the (C, K, K)
    matrices are then computed,
    clipped and searched for clusters in chunks of filters whose dense temporaries take at most
    ``cfg.max_memory_gb / 64``, between 16 and 64 MiB (larger chunks only add page faults).
    What stays in memory besides the features: the class sums (K x C x H x W float64), the
    bit-packed clipped matrices (C K^2 / 8 bytes), (C, K) summaries, and the fields and
    decision matrices only when ``cfg.save_fields`` and ``cfg.decision`` ask for them (by
    default up to K = 100; the decision matrices are kept sparse).

    Args:
        name: tap name.
        weight: trained probe weight (K, C*H*W).
        test: cached test features of this tap (and others).
        num_classes: K.
        threshold: clipping threshold.
        accuracy: the probe's test accuracy (reported only).
        train_accuracy: the probe's training accuracy (reported only).
        cfg: ``decision``, ``save_fields`` and ``max_memory_gb`` (default: ``AnalysisConfig()``).
    """
    cfg = cfg or AnalysisConfig()
    feats = test.features[name]
    c, h, w = feats.shape[1], *(feats.shape[2:4] if feats.dim() == 4 else (1, 1))
    budget = int(min(CHUNK_BYTES, max(CHUNK_BYTES / 4, cfg.max_memory_gb * 2**30 / 64)))
    keep = cfg.save_fields if cfg.save_fields != "auto" else ("float32" if num_classes <= AUTO_MAX_LABELS else "none")
    kept_gb = 2 * c * num_classes**2 * (2 if keep == "float16" else 4) / 2**30
    if keep != "none" and kept_gb > cfg.max_memory_gb:
        warnings.warn(f"{name}: keeping the fields (save_fields {keep}) takes {kept_gb:.1f} GiB, more than "
                      f"max_memory_gb {cfg.max_memory_gb:g}", stacklevel=2)
    counts = label_images(test.labels, num_classes)
    sums, unit = label_means(class_sums(feats, test.labels, num_classes, budget), counts)
    scan = scan_fields(sums, weight, threshold, keep=None if keep == "none" else keep, budget=budget, unit=unit)
    chosen = decision_filters(cfg.decision, scan.cluster_ids)
    decision = None if chosen is None else decision_matrices(feats, test.labels, weight, num_classes, chosen, budget)
    stats = layer_stats(scan.cluster_ids, scan.noise)
    return TapAnalysis(
        name=name, n_filters=c, spatial=(h, w), accuracy=accuracy, train_accuracy=train_accuracy,
        threshold=threshold, probe_weight=weight.reshape(num_classes, c, h, w).numpy(), fields=scan.fields,
        decision=decision, normalized=scan.normalized, clipped=scan.clipped, cluster_ids=scan.cluster_ids.numpy(),
        noise=scan.noise.numpy(), stats=stats, estimates=snr_estimates(stats, c, num_classes),
        snr={kind: {p: v.numpy() for p, v in parts.items()} for kind, parts in scan.snr.items()},
        cluster_fields=scan.cluster_fields.numpy(), label_images=counts.numpy(),
    )


def _fit_probes(cfg: AnalysisConfig, k: int, taps: Sequence[str], train: FeatureCache, test: FeatureCache,
                progress: bool) -> dict[str, tuple[torch.Tensor, float, float]]:
    """Train one probe per tap: ``{tap: (weight (K, D), test accuracy, train accuracy)}``.

    Each probe is trained by one process (tap i on rank i mod W, all in parallel), then shared.
    With augmented copies in ``train`` the probe draws among them; its training accuracy is the
    plain images'.
    """
    world, me = distributed.world_size(), distributed.rank()
    out = {}
    for i, name in enumerate(tqdm(taps, desc="probes", disable=not progress, leave=False)):
        if i % world == me:
            p = cfg.make_probe(k).fit(train.features[name], train.labels, progress=progress, desc=f"probe {name}",
                                      release=train.release)
            out[name] = (p.coef_, p.score(test.features[name], test.labels, test.release),
                         p.score(train.plain(name), train.labels, train.release))
            train.release()  # on-disk caches: the next tap starts from a small resident set
            test.release()
    if world > 1:
        for i, name in enumerate(taps):
            weight = out[name][0] if name in out else torch.zeros(k, train.features[name][0].numel())
            scores = torch.tensor(out[name][1:] if name in out else [0.0, 0.0], dtype=torch.float64)
            distributed.broadcast_(weight, src=i % world)
            distributed.broadcast_(scores, src=i % world)
            out[name] = (weight, *scores.tolist())
    return out


def analyze_model(model: nn.Module, bundle: DataBundle, taps: Sequence[str], cfg: AnalysisConfig = AnalysisConfig(),
                  *, model_name: str = "", progress: bool = True, timings: dict | None = None,
                  model_accuracy: float | None = None) -> AnalysisResult:
    """Run phases 2 and 3 of the method on a trained ``model``.

    Features of all taps come from one pass over the training and one over the test images (and
    one more over the training images per augmented copy, ``cfg.probe_augment``); each probe then
    trains on the cached features only.

    Under ``torchrun`` the passes are split across processes (every process ends with the full
    caches), the probes are dealt round-robin (tap i is trained by rank i mod W with the same
    seed a single process would use, and its weight and scores are broadcast), and the phase-3
    sums are added across processes. Every process returns the same result.

    Args:
        model: the trained network (left unchanged).
        bundle: the data the model was trained on.
        taps: module paths to probe, in network order.
        cfg: analysis settings.
        model_name: recorded in the result.
        progress: progress bars.
        timings: if given, filled with seconds spent in ``features``, ``probes`` and ``phase3``.
        model_accuracy: the model's accuracy on ``bundle.test`` (recorded in the result; with
            ``cfg.plateau_reference`` model, the plateau's reference); measured here when
            ``plateau_reference`` is model, it is not given and there are several taps.
    """
    if not taps:
        raise UserError("no taps to analyse; name them with --taps")
    timings = {} if timings is None else timings
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    common = dict(dtype=cfg.feature_dtype, batch_size=cfg.batch_size, max_memory_gb=cfg.max_memory_gb / 2,
                  cache_dir=cfg.cache_dir, device=device, progress=progress, pool=cfg.tap_pool)
    train = extract_features(model, bundle, bundle.train, taps, desc="features (train)", augment=cfg.probe_augment,
                             seed=cfg.seed, **common)
    test = extract_features(model, bundle, bundle.test, taps, desc="features (test)", **common)
    timings["features"] = time.perf_counter() - t0
    k = bundle.num_classes
    t0 = time.perf_counter()
    probes = _fit_probes(cfg, k, taps, train, test, progress and distributed.is_main())
    timings["probes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = []
    for name in taps:
        weight, accuracy, train_accuracy = probes[name]
        results.append(analyze_tap(name, weight, test, k, cfg.threshold, accuracy=accuracy,
                                   train_accuracy=train_accuracy, cfg=cfg))
    timings["phase3"] = time.perf_counter() - t0
    if cfg.plateau_reference == "model" and model_accuracy is None and len(results) > 1:  # one tap: it is the plateau
        from compress.training import evaluate

        model_accuracy = evaluate(model, bundle, batch_size=cfg.batch_size)
    reference = model_accuracy if cfg.plateau_reference == "model" else None
    plateau = find_plateau([r.accuracy for r in results], cfg.plateau_tolerance, reference)
    return AnalysisResult(model=model_name, dataset=bundle.name, label_names=list(bundle.label_names), taps=results,
                          plateau=results[plateau].name, plateau_tolerance=cfg.plateau_tolerance,
                          model_accuracy=model_accuracy, plateau_reference=cfg.plateau_reference)
