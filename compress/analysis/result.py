"""Result containers of the three-phase analysis, and their on-disk format (JSON + NPZ).

Format 2 (issue 17) stores the clipped matrices as bits (``numpy.packbits`` along the output
axis), the decision matrices as their non-zero entries and only when computed, and the raw and
normalised fields in float32 or float16 only when asked for (the default up to K = 100):
at K = 1,000 and 1,280 filters each dense (C, K, K) float32 array is 5 GB. Format 1 (dense
``clipped``, ``decision``, ``fields`` and ``normalized`` in every tap) is still read.

Format 3 (issue 15) averages the field matrices per true label (the sum over the label's images
divided by their number) where formats 1 and 2 stored the sums, and stores those numbers
(``label_images``); ``analysis.json`` records ``plateau_reference``. The clipped matrices,
clusters and noise of a balanced set are the same in all three; formats 1 and 2 are still read,
their ``fields`` being sums (``TapAnalysis.label_images`` is None there).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress import distributed
from compress.io import atomic_write_bytes, atomic_write_text

__all__ = ["LayerStats", "TapAnalysis", "AnalysisResult", "load_analysis", "PackedMatrices", "SparseMatrices",
           "pack_rows"]

ARTIFACT_VERSION = 3
_PACK_MAGIC = np.uint64(0x8040201008040201)  # moves byte i's low bit to bit 63 - i of the product


def pack_rows(m: np.ndarray) -> np.ndarray:
    """``numpy.packbits(m, axis=-1)`` of a bool array, eight entries per integer multiply.

    On a little-endian machine each run of 8 bools, read as one uint64 ``sum_i b_i 2^(8i)``,
    times ``sum_i 2^(63 - 9i)`` holds ``b_i`` at bit ``63 - i`` with no carries (all partial
    products fall on distinct bits), so its top byte is the packed byte, first entry highest.
    """
    m = np.asarray(m, dtype=bool)
    if sys.byteorder != "little":
        return np.packbits(m, axis=-1)
    pad = -m.shape[-1] % 8
    if pad:
        m = np.concatenate([m, np.zeros((*m.shape[:-1], pad), dtype=bool)], axis=-1)
    x = np.ascontiguousarray(m).view(np.uint64)
    return ((x * _PACK_MAGIC) >> np.uint64(56)).astype(np.uint8)


class PackedMatrices:
    """A (C, K, K) stack of boolean matrices held as bits, 8 entries a byte (``numpy.packbits``
    along the last axis). Indexing the first axis unpacks only what is asked for:
    ``packed[c]`` is filter c's (K, K) bool matrix; ``numpy.asarray(packed)`` unpacks all.

    Attributes:
        bits: (C, K, ceil(K / 8)) uint8, big-endian bit order.
        k: K, the length of the last axis before packing.
    """

    ndim = 3
    dtype = np.dtype(bool)

    def __init__(self, bits: np.ndarray, k: int):
        self.bits = np.asarray(bits, dtype=np.uint8)
        self.k = int(k)

    @classmethod
    def from_dense(cls, dense) -> "PackedMatrices":
        """Pack a (C, K, K) 0/1 array (numpy or torch)."""
        dense = np.asarray(dense, dtype=bool)
        return cls(pack_rows(dense), dense.shape[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.bits.shape[0], self.bits.shape[1], self.k)

    def __len__(self) -> int:
        return self.bits.shape[0]

    def __getitem__(self, index):
        rest = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        out = np.unpackbits(self.bits[index], axis=-1, count=self.k).astype(bool)
        return out[rest] if rest else out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class SparseMatrices:
    """(K, K) float matrices of some filters of a tap, held as their non-zero entries.

    Used for the decision matrices of Fig. 3B, which are computed for all filters or a sample of
    them and have at most one non-zero entry per test image and filter. ``sparse[c]`` is filter
    c's dense (K, K) float32 matrix (``c in sparse`` says whether it was computed);
    ``numpy.asarray(sparse)`` is the dense (C, K, K) stack, zero for filters not computed.

    Attributes:
        filters: (F,) sorted indices of the filters whose matrices were computed.
        index: (nnz,) sorted flat positions ``(f * K + row) * K + column``, f indexing ``filters``.
        values: (nnz,) float32 entries.
        n_filters: C, the number of filters of the tap.
        k: K.
    """

    ndim = 3
    dtype = np.dtype(np.float32)

    def __init__(self, filters, index, values, n_filters: int, k: int):
        self.filters = np.asarray(filters, dtype=np.int64)
        self.index = np.asarray(index, dtype=np.int64)
        self.values = np.asarray(values, dtype=np.float32)
        self.n_filters, self.k = int(n_filters), int(k)

    @classmethod
    def from_dense(cls, dense, filters=None, n_filters: int | None = None) -> "SparseMatrices":
        """From the dense (F, K, K) matrices of ``filters`` (default: all, F = C)."""
        dense = np.asarray(dense, dtype=np.float32)
        filters = np.arange(len(dense)) if filters is None else np.asarray(filters)
        index = np.flatnonzero(dense)
        return cls(filters, index, dense.reshape(-1)[index], len(dense) if n_filters is None else n_filters,
                   dense.shape[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_filters, self.k, self.k)

    def __len__(self) -> int:
        return self.n_filters

    def __contains__(self, c: int) -> bool:
        f = np.searchsorted(self.filters, c)
        return bool(f < len(self.filters) and self.filters[f] == c)

    def __getitem__(self, c: int) -> np.ndarray:
        if c not in self:
            raise KeyError(f"the matrix of filter {c} was not computed ({len(self.filters)} of {self.n_filters} were)")
        kk = self.k * self.k
        f = int(np.searchsorted(self.filters, c))
        lo, hi = np.searchsorted(self.index, [f * kk, (f + 1) * kk])
        out = np.zeros(kk, dtype=np.float32)
        out[self.index[lo:hi] - f * kk] = self.values[lo:hi]
        return out.reshape(self.k, self.k)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.zeros((self.n_filters, self.k * self.k), dtype=np.float32)
        kk = self.k * self.k
        out[self.filters[self.index // kk], self.index % kk] = self.values
        out = out.reshape(self.shape)
        return out if dtype is None else out.astype(dtype)


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
            averaged over the label's test inputs (format 3; summed in formats 1 and 2, where
            ``label_images`` is None); float32 or float16, or None when not kept
            (``save_fields``; kept by default up to K = 100).
        decision: (C, K, K) single-filter decision matrix of Fig. 3B, rows normalised: a dense
            array, a :class:`SparseMatrices` (possibly of a sample of the filters), or None
            when not computed (``decision``; computed by default up to K = 100).
        normalized: (C, K, K) ``fields`` divided by each filter's maximum, or None as ``fields``.
        clipped: (C, K, K) bool, ``normalized > threshold``: a dense array or a
            :class:`PackedMatrices` (indexing either by filter gives a (K, K) bool array).
        cluster_ids: (C, K) int, the index of the cluster each label belongs to in each
            filter, in the order the greedy procedure found them, or -1.
        noise: (C,) int, ones of ``clipped`` outside the clusters.
        snr: per-label signal and noise, ``{"boolean"|"field": {"signal"|"noise_internal"|
            "noise_external": (K,) array}}`` (Eqs. (1)-(4), Fig. 2).
        cluster_fields: (C,) float64, each filter's raw fields (as ``fields``: per-label means)
            summed over the label pairs that share one of its clusters (the strength of its
            clusters), or None (format 1).
        label_images: (K,) int64, the test images of each label the fields are averaged over, or
            None (formats 1 and 2, whose fields are sums).
    """

    name: str
    n_filters: int
    spatial: tuple[int, int]
    accuracy: float
    train_accuracy: float
    threshold: float
    probe_weight: np.ndarray
    fields: np.ndarray | None
    decision: np.ndarray | SparseMatrices | None
    normalized: np.ndarray | None
    clipped: np.ndarray | PackedMatrices
    cluster_ids: np.ndarray
    noise: np.ndarray
    stats: LayerStats
    snr: dict[str, dict[str, np.ndarray]]
    estimates: dict[str, float] = field(default_factory=dict)
    cluster_fields: np.ndarray | None = None
    label_images: np.ndarray | None = None

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
        """The arrays written to the tap's NPZ file (format 3, see the module docstring)."""
        clipped = self.clipped if isinstance(self.clipped, PackedMatrices) else PackedMatrices.from_dense(self.clipped)
        out = {
            "probe_weight": np.asarray(self.probe_weight, dtype=np.float32),
            "clipped_bits": clipped.bits,
            "cluster_ids": self.cluster_ids.astype(np.int16),
            "noise": self.noise.astype(np.int32),
            "label_counts": np.asarray(self.stats.label_counts, dtype=np.int64),
        }
        for key in ("fields", "normalized"):
            value = getattr(self, key)
            if value is not None:
                value = np.asarray(value)
                out[key] = value if value.dtype in (np.float32, np.float16) else value.astype(np.float32)
        if isinstance(self.decision, SparseMatrices):
            d = self.decision
            out.update(decision_filters=d.filters, decision_index=d.index, decision_values=d.values)
        elif self.decision is not None:
            out["decision"] = np.asarray(self.decision, dtype=np.float32)
        if self.cluster_fields is not None:
            out["cluster_fields"] = np.asarray(self.cluster_fields, dtype=np.float64)
        if self.label_images is not None:
            out["label_images"] = np.asarray(self.label_images, dtype=np.int64)
        for kind, parts in self.snr.items():
            for key, value in parts.items():
                out[f"snr_{kind}_{key}"] = np.asarray(value, dtype=np.float64)
        return out


def _tap_arrays(a: dict[str, np.ndarray], n_filters: int) -> dict:
    """The array attributes of a :class:`TapAnalysis` from a tap's NPZ members (format 1, 2 or 3)."""
    k = a["cluster_ids"].shape[1]
    if "clipped_bits" in a:
        clipped = PackedMatrices(a["clipped_bits"], k)
    else:  # format 1: dense 0/1
        clipped = a["clipped"].astype(bool)
    if "decision_index" in a:
        decision = SparseMatrices(a["decision_filters"], a["decision_index"], a["decision_values"], n_filters, k)
    else:
        decision = a.get("decision")
    counts = a.get("label_images")
    if counts is not None and counts.shape != (k,):
        raise ValueError(f"label_images has shape {counts.shape}, not ({k},)")
    return dict(probe_weight=a["probe_weight"], fields=a.get("fields"), decision=decision,
                normalized=a.get("normalized"), clipped=clipped, cluster_ids=a["cluster_ids"].astype(np.int64),
                noise=a["noise"].astype(np.int64), cluster_fields=a.get("cluster_fields"),
                label_images=counts)


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
    plateau_reference: str = "best_probe"

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
            "plateau_reference": self.plateau_reference,
            "config": self.config,  # the settings, and which split the accuracies and fields come from
            "taps": [t.summary() for t in self.taps],
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``analysis.json`` and ``arrays/<tap>.npz`` under ``folder``; returns the JSON path."""
        folder = Path(folder)
        if distributed.is_main():  # under torchrun rank 0 writes (compress.io skips the others' writes)
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
    """Read back an analysis written by :meth:`AnalysisResult.save` (artifact format 1, 2 or 3).

    The files are untrusted: a damaged, truncated or foreign artifact, or a tap name that would
    reach outside ``arrays/``, is a :class:`~compress.errors.UserError` naming the folder.
    """
    import zipfile

    from compress.errors import UserError

    folder = Path(folder)
    path = folder / "analysis.json"
    if not path.is_file():
        raise UserError(f"no analysis in {str(folder)!r}: {path.name} is missing (run `compress analyze` first)")
    try:
        return _read_analysis(folder, json.loads(path.read_text()))
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError, EOFError,
            zipfile.BadZipFile) as e:
        detail = str(e).splitlines()[0][:160] if str(e) else ""
        raise UserError(f"the analysis in {str(folder)!r} is damaged and cannot be read "
                        f"({type(e).__name__}: {detail}); run `compress analyze` again to rewrite it") from None


def _read_analysis(folder: Path, summary: Any) -> AnalysisResult:
    from compress.errors import UserError

    if not isinstance(summary, dict) or not isinstance(summary.get("taps"), list):
        raise UserError(f"{str(folder / 'analysis.json')!r} is not an analysis (no list of taps)")
    taps = []
    for s in summary["taps"]:
        name = s["name"]
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            raise UserError(f"{str(folder / 'analysis.json')!r} names a tap {str(name)[:80]!r} that is not a module path")
        with np.load(folder / "arrays" / f"{name}.npz", allow_pickle=False) as z:
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
                name=name, n_filters=s["n_filters"], spatial=(h, w), accuracy=s["accuracy"],
                train_accuracy=s["train_accuracy"], threshold=s["threshold"], stats=stats, snr=snr,
                estimates=s.get("estimates", {}), **_tap_arrays(a, s["n_filters"]),
            )
        )
    return AnalysisResult(
        model=summary["model"], dataset=summary["dataset"], label_names=summary["label_names"],
        taps=taps, plateau=summary["plateau"], plateau_tolerance=summary["plateau_tolerance"],
        model_accuracy=summary.get("model_accuracy"), config=summary.get("config", {}),
        plateau_reference=summary.get("plateau_reference", "best_probe"),
    )
