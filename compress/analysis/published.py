"""The papers' published per-layer tables, as data, and the rule that matches an analysis to them.

Every number below is copied from the papers' text (``../shared/papers/``: Tzach et al., file
``000_...``; Meir, Tzach et al., file ``001_...``), one table row a line, in the papers' column
order; thousands separators are dropped. Values the text does not give are left out (a
table may lack a column, e.g. AVGG-16 has no per-layer table: only the layer-13 values its text
states). :data:`PUBLISHED` holds every table, each with its paper and table or figure.

**Matching rule** (:func:`match_tables`): an analysis matches a published table when

1. the architecture matches: the model name ``vgg16``, ``vgg6`` or ``avgg16`` (any width or
   options: the papers' networks are full width, so N_f and FC_s differ at other widths), or
   ``timm:efficientnet_b0`` / ``torchvision:efficientnet_b0`` (any pretrained tag) for the
   second paper's EfficientNet-B0;
2. the data set matches: ``cifar10``, ``cifar100``, or ``imagefolder:<path>`` whose last path
   component, lower case without ``-`` and ``_``, is ``cifar10``, ``cifar100`` or starts with
   ``imagenet``;
3. K, the analysis' number of labels, equals the table's (CIFAR-K subsets match Tables 4-6 by K;
   a full CIFAR-10 matches the first paper's Figs. 2 and 5 and Table 6's K = 10 alike);
4. at least one of the table's layers has its tap (below) among the analysed taps.

A published layer is compared with the tap of :data:`TAP_NAMES`: the VGGs' layer m is the tap
``features.pool<m>`` (the probe after the pooling, as the papers probe); EfficientNet-B0's stage
s is timm's ``bn1`` (1), ``blocks.1`` (3), ``blocks.2`` (4), ``blocks.3`` (5), ``blocks.5`` (7),
``bn2`` (9), or torchvision's ``features.<s - 1>``. Taps by other names (``features.relu10``) are
not compared.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

__all__ = ["PublishedTable", "PUBLISHED", "TAP_NAMES", "COLUMNS", "architecture_of", "dataset_of", "tap_for",
           "match_tables", "compare", "measured_from_result", "compare_result"]

TZACH = "Tzach et al., The mechanism underlying successful deep learning (arXiv 2305.18078)"
MEIR = "Meir, Tzach et al., Universality of underlying mechanism for successful deep learning"

# the compared columns, in the papers' order; size fractions (1-6) where the table gives them
COLUMNS = ("N_f", "F_s", "FC_s", "accuracy", "n", "N_c", "C_s")
SIZE_COLUMNS = ("1", "2", "3", "4", "5", "6")


@dataclass(frozen=True)
class PublishedTable:
    """One published per-layer table.

    Attributes:
        key: a short unique name, e.g. ``meir-table6-k3``.
        paper: the paper.
        source: the table or figure (and sub-table) in it.
        architecture: ``vgg16``, ``vgg6``, ``avgg16`` or ``efficientnet_b0``.
        dataset: ``cifar10``, ``cifar100`` or ``imagenet``.
        k: the number of labels.
        unit: ``layer`` (VGGs) or ``stage`` (EfficientNet-B0).
        rows: per layer (stage) number, the values the source gives: ``N_f``, ``F_s``, ``FC_s``,
            ``accuracy``, ``accuracy_std``, ``n``, ``N_c``, ``C_s`` and ``size_fractions`` (sizes 1-6).
        note: what else the source says about the setting (samples averaged, caveats).
    """

    key: str
    paper: str
    source: str
    architecture: str
    dataset: str
    k: int
    unit: str
    rows: dict[int, dict[str, Any]]
    note: str = ""

    def __hash__(self) -> int:
        return hash(self.key)


# ----------------------------------------------------------------------------- the papers' rows

# Tzach et al., Fig. 2A: layer, No. filters (N_f), Filter's outputs (F_s), FC inputs (FC_s), SR, Std
T_FIG2A = """
    13 512 1x1 512 0.94 0.002
    10 512 2x2 2048 0.94 0.001
    7 256 4x4 4096 0.931 0.001
    4 128 8x8 8192 0.852 0.003
    2 64 16x16 16384 0.725 0.004
"""
# Tzach et al., Fig. 5A: layer, Av. Noise (n), Av. Clusters/filter (N_c), Av. Cluster size (C_s),
# cluster size fractions 1-6
T_FIG5A = """
    13 1.5 1 2.88 0.004 0.19 0.67 0.12 0.002 0
    10 3.8 3.2 1.62 0.51 0.37 0.11 0.01 0.0002 0
    7 6.4 1.3 1.66 0.50 0.37 0.11 0.02 0.0007 0
    4 18.3 1.46 2.1 0.36 0.28 0.27 0.08 0.009 0
    2 19.6 1.36 2.24 0.333 0.30 0.26 0.1 0.017 0.005
"""
# Tzach et al., Fig. 7B (VGG-6): layer, No. Filters, Filter's outputs, FC Inputs, SR, Std
T_FIG7B = """
    5 512 1x1 512 0.92 0.001
    4 512 2x2 2048 0.91 0.004
    3 256 4x4 4096 0.88 0.008
    2 128 8x8 8192 0.8 0.008
    1 64 16x16 16384 0.7 0.006
"""
# Tzach et al., Fig. 7C (VGG-6): as Fig. 5A
T_FIG7C = """
    5 3.14 1 2.6 0.12 0.36 0.35 0.14 0.02 0.002
    4 5.47 1.1 1.4 0.66 0.26 0.06 0.01 0 0
    3 12.28 1.31 1.7 0.48 0.35 0.14 0.03 0.002 0
    2 18.16 1.42 2.2 0.34 0.34 0.23 0.07 0.03 0.001
    1 18.5 1.3 2.1 0.4 0.33 0.2 0.1 0.008 0.002
"""
# Meir, Tzach et al., Tables 1-6: layer (stage), N_f, F_s, FC_s, Accuracy, n, N_c, C_s.
# Table 1: VGG-16 on CIFAR-100
M_T1 = """
    13 512 1x1 512 0.745 277.1 1.7 7.7
    10 512 2x2 2048 0.752 16.3 2.6 2.0
    7 256 4x4 4096 0.577 117.9 2.8 2.7
    4 128 8x8 8192 0.439 552.4 5.1 2.8
    2 64 16x16 16384 0.352 987.8 5.8 3.2
"""
# Table 2: EfficientNet-B0 on CIFAR-100 (stages)
M_T2 = """
    9 1280 1x1 1280 0.863 31.6 1.2 3
    7 192 1x1 192 0.729 232.0 3.5 2.1
    5 80 2x2 320 0.503 308.7 3.6 1.7
    4 40 4x4 640 0.502 436.9 5.2 1.7
    3 24 8x8 1536 0.426 526.2 5.6 1.8
    1 32 16x16 8192 0.259 1208.1 2.9 5.3
"""
# Table 3: EfficientNet-B0 on ImageNet (stages; "Filter's outputs" and "FC size" are F_s and FC_s)
M_T3 = """
    9 1280 1x1 1280 0.750 1057.7 3.5 4.4
    7 192 1x1 192 0.489 5729.6 8.3 3.2
    5 80 2x2 320 0.187 7168.0 8.9 2.6
    4 40 4x4 640 0.136 13416.9 16.5 2.5
    3 24 8x8 1536 0.065 6471.0 13.2 1.9
    1 32 16x16 8192 0.022 50381.9 8.5 7.4
"""
# Table 4: VGG-16 on CIFAR-K/100, K = 10, 20, 40, 60
M_T4_K10 = """
    13 512 1x1 512 0.926 3.26 1.01 2.2
    10 512 2x2 2048 0.931 4.86 1.83 1.6
    7 256 4x4 4096 0.908 10.11 1.47 1.7
    4 128 8x8 8192 0.890 15.83 1.6 1.8
    2 64 16x16 16384 0.829 18.64 1.6 2.0
"""
M_T4_K20 = """
    13 512 1x1 512 0.9115 9.92 1.02 3.7
    10 512 2x2 2048 0.9115 13.6 2.33 1.9
    7 256 4x4 4096 0.9065 33.6 1.64 2.31
    4 128 8x8 8192 0.8465 57 2 2.4
    2 64 16x16 16384 0.752 68.23 1.83 2.7
"""
M_T4_K40 = """
    13 512 1x1 512 0.8553 51.8 1.11 7.5
    10 512 2x2 2048 0.8567 12.3 2.92 2
    7 256 4x4 4096 0.7825 38.4 2.44 2.17
    4 128 8x8 8192 0.6388 143.8 3.22 2.54
    2 64 16x16 16384 0.5380 203.6 3.5 2.7
"""
M_T4_K60 = """
    13 512 1x1 512 0.8277 123.9 1.3 8.13
    10 512 2x2 2048 0.8275 18.17 2.78 2.3
    7 256 4x4 4096 0.7148 39.52 2.16 2.24
    4 128 8x8 8192 0.5392 260.6 4.16 2.6
    2 64 16x16 16384 0.4480 423.92 4.5 3
"""
# Table 5: EfficientNet-B0 on CIFAR-K/100, K = 10, 20, 40, 60
M_T5_K10 = """
    9 1280 1x1 1280 0.986 3.8 1.08 1.6
    7 192 1x1 192 0.955 8.3 1.80 1.3
    5 80 2x2 320 0.851 10.6 1.85 1.2
    4 40 4x4 640 0.845 12.8 2.15 1.3
    3 24 8x8 1536 0.755 14.5 2.75 1.3
    1 32 16x16 8192 0.634 18.1 1.55 1.9
"""
M_T5_K20 = """
    9 1280 1x1 1280 0.973 8.1 1.1 2.0
    7 192 1x1 192 0.915 22.9 2.1 1.5
    5 80 2x2 320 0.765 29.7 2.0 1.3
    4 40 4x4 640 0.764 40.8 2.8 1.4
    3 24 8x8 1536 0.645 48.1 3.4 1.4
    1 32 16x16 8192 0.482 63.8 1.5 3.1
"""
M_T5_K40 = """
    9 1280 1x1 1280 0.935 16.4 1.1 2.4
    7 192 1x1 192 0.849 64.2 2.6 1.7
    5 80 2x2 320 0.652 85.2 2.7 1.4
    4 40 4x4 640 0.650 111.3 3.3 1.5
    3 24 8x8 1536 0.553 129.6 3.9 1.6
    1 32 16x16 8192 0.362 223.6 1.9 3.9
"""
M_T5_K60 = """
    9 1280 1x1 1280 0.915 21.4 1.2 2.6
    7 192 1x1 192 0.810 121.8 3.2 1.9
    5 80 2x2 320 0.593 152.0 3.0 1.6
    4 40 4x4 640 0.603 200.0 3.8 1.6
    3 24 8x8 1536 0.511 252.3 4.8 1.7
    1 32 16x16 8192 0.313 492.6 2.5 4.4
"""
# Table 6: VGG-16 on CIFAR-K/10, K = 3, 6, 8, 10
M_T6_K3 = """
    13 512 1x1 512 0.988 0.07 1 1.02
    10 512 2x2 2048 0.988 0.27 1.5 1.02
    7 256 4x4 4096 0.989 0.67 1.2 1.06
    4 128 8x8 8192 0.972 1.70 1.1 1.12
    2 64 16x16 16384 0.927 1.78 1.1 1.25
"""
M_T6_K6 = """
    13 512 1x1 512 0.968 0.40 1 1.8
    10 512 2x2 2048 0.967 1.16 2.4 1.3
    7 256 4x4 4096 0.957 2.12 1.3 1.4
    4 128 8x8 8192 0.930 6.69 1.2 1.6
    2 64 16x16 16384 0.860 7.59 1.1 1.7
"""
M_T6_K8 = """
    13 512 1x1 512 0.961 0.63 1 2.2
    10 512 2x2 2048 0.958 2.17 2.8 1.4
    7 256 4x4 4096 0.954 4.07 1.2 1.6
    4 128 8x8 8192 0.890 12.4 1.4 1.8
    2 64 16x16 16384 0.783 13.0 1.3 1.8
"""
M_T6_K10 = """
    13 512 1x1 512 0.94 1.5 1 2.8
    10 512 2x2 2048 0.94 3.8 3.2 1.6
    7 256 4x4 4096 0.93 6.4 1.3 1.6
    4 128 8x8 8192 0.85 18.3 1.4 2.1
    2 64 16x16 16384 0.72 19.6 1.3 2.1
"""


def _parse(text: str, columns: tuple[str, ...]) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    for line in text.strip().splitlines():
        layer, *values = line.split()
        row: dict[str, Any] = {}
        for col, v in zip(columns, values):
            row[col] = v if col == "F_s" else int(v) if col in ("N_f", "FC_s") else float(v)
        if "f1" in row:
            row["size_fractions"] = [row.pop(f"f{i}") for i in range(1, 7)]
        rows[int(layer)] = row
    return rows


def _merge(*parts: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for part in parts:
        for layer, row in part.items():
            out.setdefault(layer, {}).update(row)
    return out


_MEIR_COLS = ("N_f", "F_s", "FC_s", "accuracy", "n", "N_c", "C_s")
_SR_COLS = ("N_f", "F_s", "FC_s", "accuracy", "accuracy_std")
_FIG5_COLS = ("n", "N_c", "C_s", "f1", "f2", "f3", "f4", "f5", "f6")
_T4_NOTE = ("The caption says K = 10, 20, 30 and 60; the sub-tables are headed CIFAR-10/100, CIFAR-20/100, "
            "CIFAR-40/100 and CIFAR-60/100, which this follows. Labels drawn uniformly from the 20 superclasses, "
            "nested (Supplementary, Fig. 3); at least four samples (Supplementary, Statistics).")
_T5_NOTE = ("The caption says K = 10, 20, 30 and 60; the sub-tables are headed CIFAR-10/100 to CIFAR-60/100, "
            "which this follows. Stage outputs average-pooled 7x7 at 224x224 before the probe; at least five "
            "samples (Supplementary, Statistics).")
_T6_NOTE = ("Nested labels, the smallest K drawn at random (Supplementary, Fig. 5); five samples (Supplementary, "
            "Statistics). The error is read at layer 10 (Fig. 5).")


def _tables() -> list[PublishedTable]:
    t = [
        PublishedTable("tzach-vgg16-cifar10", TZACH, "Fig. 2A (N_f, F_s, FC_s, SR as accuracy, its Std) and Fig. 5A "
                       "(n, N_c, C_s, cluster size fractions 1-6)", "vgg16", "cifar10", 10, "layer",
                       _merge(_parse(T_FIG2A, _SR_COLS), _parse(T_FIG5A, _FIG5_COLS)),
                       "Fig. 5A averages four trained VGG-16 samples."),
        PublishedTable("tzach-vgg6-cifar10", TZACH, "Fig. 7B (N_f, F_s, FC_s, SR, Std) and Fig. 7C (n, N_c, C_s, "
                       "cluster size fractions 1-6)", "vgg6", "cifar10", 10, "layer",
                       _merge(_parse(T_FIG7B, _SR_COLS), _parse(T_FIG7C, _FIG5_COLS)),
                       "Fig. 7C averages five trained VGG-6 samples."),
        PublishedTable("tzach-avgg16-cifar10", TZACH, "text of 'AVGG-16' (SR 0.955; noise ~1.1 averaged over three "
                       "samples) and Fig. 8B (average cluster size 2.5)", "avgg16", "cifar10", 10, "layer",
                       {13: {"accuracy": 0.955, "n": 1.1, "C_s": 2.5}},
                       "Layer 13 only, as the text gives it; N_f, F_s, FC_s and N_c are not stated for AVGG-16."),
        PublishedTable("meir-table1", MEIR, "Table 1 (VGG-16 on CIFAR-100)", "vgg16", "cifar100", 100, "layer",
                       _parse(M_T1, _MEIR_COLS)),
        PublishedTable("meir-table2", MEIR, "Table 2 (EfficientNet-B0 on CIFAR-100)", "efficientnet_b0", "cifar100",
                       100, "stage", _parse(M_T2, _MEIR_COLS),
                       "Transfer-learned from ImageNet at 224x224; stage outputs average-pooled 7x7 before the probe."),
        PublishedTable("meir-table3", MEIR, "Table 3 (EfficientNet-B0 on ImageNet)", "efficientnet_b0", "imagenet",
                       1000, "stage", _parse(M_T3, _MEIR_COLS),
                       "Probes trained on 40,000 of the 50,000 validation images and tested on the other 10,000."),
    ]
    for k, text in ((10, M_T4_K10), (20, M_T4_K20), (40, M_T4_K40), (60, M_T4_K60)):
        t.append(PublishedTable(f"meir-table4-k{k}", MEIR, f"Table 4, 'VGG-16 on CIFAR-{k}/100'", "vgg16", "cifar100",
                                k, "layer", _parse(text, _MEIR_COLS), _T4_NOTE))
    for k, text in ((10, M_T5_K10), (20, M_T5_K20), (40, M_T5_K40), (60, M_T5_K60)):
        t.append(PublishedTable(f"meir-table5-k{k}", MEIR, f"Table 5, 'EfficientNet-B0 on CIFAR-{k}/100'",
                                "efficientnet_b0", "cifar100", k, "stage", _parse(text, _MEIR_COLS), _T5_NOTE))
    for k, text in ((3, M_T6_K3), (6, M_T6_K6), (8, M_T6_K8), (10, M_T6_K10)):
        t.append(PublishedTable(f"meir-table6-k{k}", MEIR, f"Table 6, 'VGG-16 on CIFAR-{k}/10'", "vgg16", "cifar10",
                                k, "layer", _parse(text, _MEIR_COLS), _T6_NOTE))
    return t


PUBLISHED: dict[str, PublishedTable] = {t.key: t for t in _tables()}

_VGG16_TAPS = {m: f"features.pool{m}" for m in (2, 4, 7, 10, 13)}
TAP_NAMES: dict[str, dict[int, str]] = {
    "vgg16": _VGG16_TAPS,
    "vgg6": {m: f"features.pool{m}" for m in range(1, 6)},
    "avgg16": {7: "features.pool7", 13: "features.pool13"},
    "timm:efficientnet_b0": {1: "bn1", 3: "blocks.1", 4: "blocks.2", 5: "blocks.3", 7: "blocks.5", 9: "bn2"},
    "torchvision:efficientnet_b0": {s: f"features.{s - 1}" for s in range(1, 10)},
}


def architecture_of(model: str) -> str | None:
    """The published architecture a model name stands for (see the module's matching rule), or None."""
    name = str(model).strip().lower()
    if name in ("vgg16", "vgg6", "avgg16"):
        return name
    lib, _, base = name.partition(":")
    if lib in ("timm", "torchvision") and base.split(".")[0] == "efficientnet_b0":
        return "efficientnet_b0"
    return None


def dataset_of(dataset: str) -> str | None:
    """The published data set a data set name stands for (``cifar10``, ``cifar100``, ``imagenet``), or None."""
    name = str(dataset).strip()
    if name.startswith("imagefolder:"):
        name = PurePosixPath(name[len("imagefolder:"):].replace("\\", "/").rstrip("/")).name
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    if key in ("cifar10", "cifar100"):
        return key
    return "imagenet" if key.startswith("imagenet") else None


def tap_for(model: str, layer: int) -> str | None:
    """The tap name of a published layer (stage) for this model, or None."""
    name = str(model).strip().lower()
    arch = architecture_of(name)
    if arch is None:
        return None
    table = TAP_NAMES.get(arch) or TAP_NAMES.get(name.split(".")[0]) or {}
    return table.get(int(layer))


def match_tables(model: str, dataset: str, k: int) -> list[PublishedTable]:
    """The published tables of this setting (architecture, data set, K), first paper first."""
    arch, data = architecture_of(model), dataset_of(dataset)
    if arch is None or data is None:
        return []
    return [t for t in PUBLISHED.values() if t.architecture == arch and t.dataset == data and t.k == int(k)]


def _number(v: Any) -> float | None:
    if v is None or isinstance(v, str):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def compare(table: PublishedTable, measured: dict[str, dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """Published beside measured, one row per published layer (deepest first, as the papers).

    Args:
        table: the published table.
        measured: per tap name, its values under the keys of :data:`COLUMNS` (and ``size_fractions``).
        model: the model name (for the tap names, :func:`tap_for`).

    Returns:
        ``[{"layer", "tap", "analysed", "columns": {column: {"measured", "published", "difference"}}}]``:
        difference = measured - published where both are numbers, ``"same"``/``"differs"`` for F_s,
        None where either is missing. Columns the table does not give are left out.
    """
    out = []
    for layer in sorted(table.rows, reverse=True):
        pub = table.rows[layer]
        tap = tap_for(model, layer)
        ours = measured.get(tap, {}) if tap else {}
        cols: dict[str, dict[str, Any]] = {}
        for col in COLUMNS:
            if col not in pub:
                continue
            m, p = ours.get(col), pub[col]
            if col == "F_s":
                diff = None if m is None else ("same" if str(m) == str(p) else "differs")
            else:
                a, b = _number(m), _number(p)
                diff = None if a is None or b is None else a - b
            cols[col] = {"measured": m, "published": p, "difference": diff}
        if "size_fractions" in pub:
            fractions = list(ours.get("size_fractions") or [])
            for i, col in enumerate(SIZE_COLUMNS):
                m = fractions[i] if i < len(fractions) else (0.0 if fractions else None)
                p = pub["size_fractions"][i]
                a = _number(m)
                cols[col] = {"measured": m, "published": p, "difference": None if a is None else a - p}
        out.append({"layer": layer, "tap": tap, "analysed": tap in measured, "columns": cols})
    return out


def measured_from_result(result: Any) -> dict[str, dict[str, Any]]:
    """Per tap of an :class:`~compress.analysis.result.AnalysisResult`, the values :func:`compare` reads."""
    return {t.name: {"N_f": t.n_filters, "F_s": t.filter_size, "FC_s": t.fc_size, "accuracy": t.accuracy,
                     "n": t.stats.noise, "N_c": t.stats.clusters_per_filter, "C_s": t.stats.cluster_size,
                     "size_fractions": list(t.stats.size_fractions)} for t in result.taps}


def compare_result(result: Any) -> list[tuple[PublishedTable, list[dict[str, Any]]]]:
    """Every published table matching ``result`` (:func:`match_tables`) with its comparison, where
    at least one published layer's tap was analysed."""
    measured = measured_from_result(result)
    out = [(t, compare(t, measured, result.model)) for t in match_tables(result.model, result.dataset,
                                                                         result.num_classes)]
    return [(t, rows) for t, rows in out if any(r["analysed"] for r in rows)]
