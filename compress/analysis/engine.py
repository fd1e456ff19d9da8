"""Phases 2 and 3 on a trained model: one feature pass, one probe per tap, every filter's matrices."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from compress import distributed
from compress.analysis.clusters import find_clusters_batched, noise_batched
from compress.analysis.fields import clip_fields, field_matrices, normalize_fields
from compress.analysis.result import AnalysisResult, TapAnalysis
from compress.analysis.stats import find_plateau, label_snr, layer_stats, snr_estimates
from compress.data import DataBundle
from compress.errors import OptionError, UserError
from compress.analysis.features import FeatureCache, extract_features
from compress.analysis.probes import LinearProbe

__all__ = ["AnalysisConfig", "analyze_model", "analyze_tap"]


@dataclass(frozen=True)
class AnalysisConfig:
    """Settings of phases 2 and 3 (probe defaults from the method's public implementation).

    Attributes:
        taps: module paths or globs to analyse (default: the model's stage ends and final feature layer).
        split: where probe accuracies, the plateau and the field matrices are measured: val (the
            validation split, so choices made from them are not made on the test split) or test (the papers' setting).
        threshold: clipping threshold of the normalised field matrices, in (0, 1).
        probe_epochs: training epochs of each linear probe.
        probe_batch_size: images per probe step.
        probe_lr: probe learning rate.
        probe_momentum: probe SGD momentum.
        probe_weight_decay: probe L2 weight decay.
        probe_lr_decay: factor on the probe learning rate after every epoch.
        plateau_tolerance: accuracy points below the best probe still counted as the plateau.
        feature_dtype: precision of the cached tap features.
        max_memory_gb: feature caches larger than this go to memory-mapped files.
        cache_dir: folder for those files (default: a temporary folder).
        batch_size: images per forward pass during feature extraction.
        tap_pool: average-pool each tap KxK, stride K, before its probe (the paper used 7 at 224x224).
        seed: probe initialisation and shuffling.
    """

    taps: list[str] | None = None
    split: Literal["val", "test"] = "val"
    threshold: float = 0.3
    probe_epochs: int = 200
    probe_batch_size: int = 100
    probe_lr: float = 0.01
    probe_momentum: float = 0.975
    probe_weight_decay: float = 1e-3
    probe_lr_decay: float = 0.975
    plateau_tolerance: float = 0.5
    feature_dtype: Literal["float32", "float16"] = "float32"
    max_memory_gb: float = 4.0
    cache_dir: str | None = None
    batch_size: int = 100
    tap_pool: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise OptionError("threshold", f"{self.threshold} is outside (0, 1); the papers use 0.3 (robust in 0.3-0.6)")
        if self.probe_epochs < 1:
            raise UserError(f"probe_epochs must be at least 1, got {self.probe_epochs}")
        if self.plateau_tolerance < 0:
            raise UserError(f"plateau_tolerance must be >= 0 points, got {self.plateau_tolerance}")

    def make_probe(self, num_classes: int) -> LinearProbe:
        return LinearProbe(num_classes, epochs=self.probe_epochs, batch_size=self.probe_batch_size, lr=self.probe_lr,
                           momentum=self.probe_momentum, weight_decay=self.probe_weight_decay,
                           lr_decay=self.probe_lr_decay, seed=self.seed)


def analyze_tap(name: str, weight: torch.Tensor, test: FeatureCache, num_classes: int, threshold: float,
                accuracy: float = float("nan"), train_accuracy: float = float("nan")) -> TapAnalysis:
    """Phase 3 for one tap: field and decision matrices, clipping, clusters, noise, statistics, SNR.

    Args:
        name: tap name.
        weight: trained probe weight (K, C*H*W).
        test: cached test features of this tap (and others).
        num_classes: K.
        threshold: clipping threshold.
        accuracy: the probe's test accuracy (reported only).
        train_accuracy: the probe's training accuracy (reported only).
    """
    feats = test.features[name]
    c, h, w = feats.shape[1], *(feats.shape[2:4] if feats.dim() == 4 else (1, 1))
    fields, decision = field_matrices(feats, test.labels, weight, num_classes)
    normalized = normalize_fields(fields)
    clipped = clip_fields(normalized, threshold)
    ids = find_clusters_batched(clipped)
    noise = noise_batched(clipped, ids)
    stats = layer_stats(ids, noise)
    snr = label_snr(clipped, fields, ids)
    return TapAnalysis(
        name=name, n_filters=c, spatial=(h, w), accuracy=accuracy, train_accuracy=train_accuracy,
        threshold=threshold, probe_weight=weight.reshape(num_classes, c, h, w).numpy(), fields=fields.numpy(),
        decision=decision.numpy(), normalized=normalized.numpy(), clipped=clipped.numpy(), cluster_ids=ids.numpy(),
        noise=noise.numpy(), stats=stats, snr={k: {p: v.numpy() for p, v in d.items()} for k, d in snr.items()},
        estimates=snr_estimates(stats, c, num_classes),
    )


def _fit_probes(cfg: AnalysisConfig, k: int, taps: Sequence[str], train: FeatureCache, test: FeatureCache,
                progress: bool) -> dict[str, tuple[torch.Tensor, float, float]]:
    """Train one probe per tap: ``{tap: (weight (K, D), test accuracy, train accuracy)}``.

    Each probe is trained by one process (tap i on rank i mod W, all in parallel), then shared.
    """
    world, me = distributed.world_size(), distributed.rank()
    out = {}
    for i, name in enumerate(tqdm(taps, desc="probes", disable=not progress, leave=False)):
        if i % world == me:
            p = cfg.make_probe(k).fit(train.features[name], train.labels, progress=progress, desc=f"probe {name}")
            out[name] = (p.coef_, p.score(test.features[name], test.labels),
                         p.score(train.features[name], train.labels))
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
                  *, model_name: str = "", progress: bool = True, timings: dict | None = None) -> AnalysisResult:
    """Run phases 2 and 3 of the method on a trained ``model``.

    Features of all taps come from one pass over the training and one over the test images;
    each probe then trains on the cached features only.

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
    """
    if not taps:
        raise UserError("no taps to analyse; name them with --taps")
    timings = {} if timings is None else timings
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    common = dict(dtype=cfg.feature_dtype, batch_size=cfg.batch_size, max_memory_gb=cfg.max_memory_gb / 2,
                  cache_dir=cfg.cache_dir, device=device, progress=progress, pool=cfg.tap_pool)
    train = extract_features(model, bundle, bundle.train, taps, desc="features (train)", **common)
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
                                   train_accuracy=train_accuracy))
    timings["phase3"] = time.perf_counter() - t0
    plateau = find_plateau([r.accuracy for r in results], cfg.plateau_tolerance)
    return AnalysisResult(model=model_name, dataset=bundle.name, label_names=list(bundle.label_names), taps=results,
                          plateau=results[plateau].name, plateau_tolerance=cfg.plateau_tolerance)
