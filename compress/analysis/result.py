"""Result containers of the three-phase analysis, and their on-disk format (JSON + NPZ)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.io import atomic_write_bytes, atomic_write_text

__all__ = ["LayerStats", "TapAnalysis", "AnalysisResult", "load_analysis"]

ARTIFACT_VERSION = 1


@dataclass
class LayerStats:
    """Averages over the filters of one tap, the columns of the papers' tables.

    Attributes:
        noise: n, mean noise ones per filter (over filters with at least one cluster).
        clusters_per_filter: N_c, mean clusters per filter (same filters).
        cluster_size: C_s, mean labels per cluster over all clusters of the tap.
        size_fractions: fraction of clusters with 1, 2, ... K labels (index 0 = size 1).
        filters_without_cluster: filters whose clipped matrix has no diagonal one (reported
            apart, not averaged in as noise 0).
        label_counts: clusters containing each label (Fig. 5B), shape (K,).
    """

    noise: float
    clusters_per_filter: float
    cluster_size: float
    size_fractions: list[float]
    filters_without_cluster: int
    label_counts: list[int]


@dataclass
class TapAnalysis:
    """Everything measured at one tap: the probe (phase 2) and the per-filter matrices (phase 3).

    Array attributes (K labels, C filters, H x W spatial positions):
        probe_weight: (K, C, H, W) bias-free probe weight.
        fields: (C, K, K) raw output fields, row = true label, column = output unit,
            summed over the test inputs.
        decision: (C, K, K) single-filter decision matrix of Fig. 3B, rows normalised.
        normalized: (C, K, K) ``fields`` divided by each filter's maximum.
        clipped: (C, K, K) bool, ``normalized > threshold``.
        cluster_ids: (C, K) int, the index of the cluster each label belongs to in each
            filter, in the order the greedy procedure found them, or -1.
        noise: (C,) int, ones of ``clipped`` outside the clusters.
        snr: per-label signal and noise, ``{"boolean"|"field": {"signal"|"noise_internal"|
            "noise_external": (K,) array}}`` (Eqs. (1)-(4), Fig. 2).
    """

    name: str
    n_filters: int
    spatial: tuple[int, int]
    accuracy: float
    train_accuracy: float
    threshold: float
    probe_weight: np.ndarray
    fields: np.ndarray
    decision: np.ndarray
    normalized: np.ndarray
    clipped: np.ndarray
    cluster_ids: np.ndarray
    noise: np.ndarray
    stats: LayerStats
    snr: dict[str, dict[str, np.ndarray]]
    estimates: dict[str, float] = field(default_factory=dict)

    @property
    def fc_size(self) -> int:
        """FC_s, the number of probe inputs (C * H * W)."""
        return self.n_filters * self.spatial[0] * self.spatial[1]

    @property
    def filter_size(self) -> str:
        """F_s as the papers write it, e.g. ``"2x2"``."""
        return f"{self.spatial[0]}x{self.spatial[1]}"

    @property
    def n_clusters(self) -> np.ndarray:
        """(C,) number of clusters per filter."""
        return self.cluster_ids.max(axis=1) + 1

    def clusters(self, c: int) -> list[list[int]]:
        """The clusters of filter ``c`` as label lists, in the order they were found."""
        ids = self.cluster_ids[c]
        return [np.flatnonzero(ids == k).tolist() for k in range(int(ids.max()) + 1)]

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: the table row, the statistics and the SNR estimates."""
        return {
            "name": self.name,
            "n_filters": self.n_filters,
            "filter_size": self.filter_size,
            "fc_size": self.fc_size,
            "accuracy": self.accuracy,
            "train_accuracy": self.train_accuracy,
            "threshold": self.threshold,
            **asdict(self.stats),
            "estimates": self.estimates,
            "snr_mean": {
                kind: {k: float(np.mean(v)) for k, v in parts.items()} for kind, parts in self.snr.items()
            },
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays written to the tap's NPZ file."""
        out = {
            "probe_weight": self.probe_weight.astype(np.float32),
            "fields": self.fields.astype(np.float64),
            "decision": self.decision.astype(np.float32),
            "normalized": self.normalized.astype(np.float32),
            "clipped": self.clipped.astype(np.uint8),
            "cluster_ids": self.cluster_ids.astype(np.int16),
            "noise": self.noise.astype(np.int32),
            "label_counts": np.asarray(self.stats.label_counts, dtype=np.int64),
        }
        for kind, parts in self.snr.items():
            for key, value in parts.items():
                out[f"snr_{kind}_{key}"] = np.asarray(value, dtype=np.float64)
        return out


@dataclass
class AnalysisResult:
    """The whole analysis of one model: one :class:`TapAnalysis` per tap, in network order."""

    model: str
    dataset: str
    label_names: list[str]
    taps: list[TapAnalysis]
    plateau: str
    plateau_tolerance: float
    model_accuracy: float | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def tap(self, name: str) -> TapAnalysis:
        """The analysis of the tap called ``name``."""
        for t in self.taps:
            if t.name == name:
                return t
        from compress.errors import unknown_name

        raise unknown_name("tap", name, [t.name for t in self.taps])

    def summary(self) -> dict[str, Any]:
        return {
            "artifact_version": ARTIFACT_VERSION,
            "model": self.model,
            "dataset": self.dataset,
            "label_names": self.label_names,
            "model_accuracy": self.model_accuracy,
            "plateau": self.plateau,
            "plateau_tolerance": self.plateau_tolerance,
            "config": self.config,  # the settings, and which split the accuracies and fields come from
            "taps": [t.summary() for t in self.taps],
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``analysis.json`` and ``arrays/<tap>.npz`` under ``folder``; returns the JSON path."""
        folder = Path(folder)
        (folder / "arrays").mkdir(parents=True, exist_ok=True)
        for t in self.taps:
            import io

            buf = io.BytesIO()
            np.savez_compressed(buf, **t.arrays())
            atomic_write_bytes(folder / "arrays" / f"{t.name}.npz", buf.getvalue())
        path = folder / "analysis.json"
        atomic_write_text(path, json.dumps(self.summary(), indent=2))
        return path


def load_analysis(folder: str | os.PathLike) -> AnalysisResult:
    """Read back an analysis written by :meth:`AnalysisResult.save`."""
    from compress.errors import UserError

    folder = Path(folder)
    path = folder / "analysis.json"
    if not path.is_file():
        raise UserError(f"no analysis in {str(folder)!r}: {path.name} is missing (run `compress analyze` first)")
    summary = json.loads(path.read_text())
    taps = []
    for s in summary["taps"]:
        with np.load(folder / "arrays" / f"{s['name']}.npz") as z:
            a = {k: z[k] for k in z.files}
        h, w = (int(v) for v in s["filter_size"].split("x"))
        snr: dict[str, dict[str, np.ndarray]] = {}
        for key in [k for k in a if k.startswith("snr_")]:
            _, kind, part = key.split("_", 2)
            snr.setdefault(kind, {})[part] = a[key]
        stats = LayerStats(
            **{k: s[k] for k in ("noise", "clusters_per_filter", "cluster_size", "size_fractions",
                                 "filters_without_cluster", "label_counts")}
        )
        taps.append(
            TapAnalysis(
                name=s["name"], n_filters=s["n_filters"], spatial=(h, w), accuracy=s["accuracy"],
                train_accuracy=s["train_accuracy"], threshold=s["threshold"],
                probe_weight=a["probe_weight"], fields=a["fields"], decision=a["decision"],
                normalized=a["normalized"], clipped=a["clipped"].astype(bool),
                cluster_ids=a["cluster_ids"].astype(np.int64), noise=a["noise"].astype(np.int64),
                stats=stats, snr=snr, estimates=s.get("estimates", {}),
            )
        )
    return AnalysisResult(
        model=summary["model"], dataset=summary["dataset"], label_names=summary["label_names"],
        taps=taps, plateau=summary["plateau"], plateau_tolerance=summary["plateau_tolerance"],
        model_accuracy=summary.get("model_accuracy"), config=summary.get("config", {}),
    )
