"""The analysis report: figures (PNG), a Markdown file and one self-contained HTML file.

The report follows the papers' presentation: the per-tap table (Tables 1-2), probe accuracy and
noise per tap, the SNR of Eqs. (1)-(4) with the Fig. 2 plot, the cluster statistics of Fig. 5 and,
for a few filters per tap, the single-filter matrices of Figs. 3B and 4. The document is built once
as a list of blocks and rendered twice, so the Markdown and the HTML always say the same thing.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from compress.analysis.published import SIZE_COLUMNS as _PUBLISHED_SIZES  # noqa: E402
from compress.analysis.published import compare_result  # noqa: E402
from compress.analysis.result import AnalysisResult, TapAnalysis  # noqa: E402
from compress.reports.document import Figure as _Figure  # noqa: E402
from compress.reports.document import Heading as _Heading  # noqa: E402
from compress.reports.document import Para as _Para  # noqa: E402
from compress.reports.document import Table as _Table  # noqa: E402
from compress.reports.document import render_html as _render_html  # noqa: E402,F401
from compress.reports.document import render_markdown as _render_markdown  # noqa: E402,F401
from compress.reports.document import save_figure as _save  # noqa: E402
from compress.reports.document import write_document  # noqa: E402

__all__ = ["write_report"]

MAX_TICK_LABELS = 20  # above this many labels, axes carry no per-label ticks
MAX_LISTED_LABELS = 30  # labels named in the introduction
MAX_MATRIX_LABELS = 100  # above this many labels, the per-filter panels show only the labels of the clusters
SIZE_COLUMNS = 6  # cluster sizes 1..6 shown in the table, as in Fig. 5A
_PERMUTED_CMAP = ListedColormap(["black", "white", "gold"])  # 0, cluster one, noise one
_LEGEND = (
    "N_f: number of filters; F_s: spatial size per filter; FC_s: probe inputs (N_f x F_s); "
    "Accuracy: test accuracy of the probe; n: mean noise per filter (ones outside the clusters); "
    "N_c: clusters per filter; C_s: mean cluster size; 1-6: fraction of clusters of that size; "
    "no-cluster filters: filters without any cluster, not averaged into n and N_c."
)




def write_report(result: AnalysisResult, folder: str | Path, filters_per_tap: int = 3) -> dict[str, Path]:
    """Write the analysis report of ``result`` under ``folder``.

    Args:
        result: the analysis to present.
        folder: where ``report.md``, ``report.html`` and ``figures/*.png`` are written.
        filters_per_tap: how many filters per tap get the single-filter matrices; the filters
            with the most labels in clusters come first, filters without clusters are skipped.

    Returns:
        ``{"markdown": path, "html": path}``.
    """
    from compress import distributed

    if not distributed.is_main():  # under torchrun rank 0 draws and writes the report
        return {"markdown": Path(folder) / "report.md", "html": Path(folder) / "report.html"}
    return write_document(folder, _title(result), _build_blocks(result, filters_per_tap))


def _title(result: AnalysisResult) -> str:
    return f"Analysis of {result.model} on {result.dataset} ({result.num_classes} labels)"


# ----------------------------------------------------------------------------- document


def _probe_note(cfg: dict) -> str:
    """How the probes were trained, from the recorded analysis settings."""
    if not cfg:
        return "Probe settings: not recorded."
    preset = f" (preset {cfg['probe_preset']})" if cfg.get("probe_preset") else ""
    n = int(cfg.get("probe_augment") or 0)
    augment = (f"on the plain training features and {n} augmented cop{'y' if n == 1 else 'ies'} of each image "
               f"(one version per image per epoch)" if n else "on the plain (unaugmented) training features")
    return (f"Probes{preset}: {cfg.get('probe_epochs')} epochs, batch {cfg.get('probe_batch_size')}, lr "
            f"{cfg.get('probe_lr')}, momentum {cfg.get('probe_momentum')}, weight decay {cfg.get('probe_weight_decay')}, "
            f"lr x{cfg.get('probe_lr_decay')} every {cfg.get('probe_lr_step', 1)} epoch(s); trained {augment}.")


def _build_blocks(result: AnalysisResult, filters_per_tap: int) -> list:
    names = list(result.label_names)
    taps = result.taps
    plateau = next((t for t in taps if t.name == result.plateau), None)
    blocks: list = [_Heading(1, _title(result))]
    intro = f"Dataset {result.dataset} with {len(names)} labels; {len(taps)} taps analysed."
    split = {"val": "validation", "test": "test"}.get(result.config.get("split", "test"), "test")
    if result.model_accuracy is not None:
        intro += f" Model {split} accuracy: {result.model_accuracy:.3f}."
    blocks.append(_Para(intro))
    if result.config.get("split_note"):
        blocks.append(_Para(result.config["split_note"]))
    blocks.append(_Para(_probe_note(result.config.get("analysis") or {})))
    more = f", ... ({len(names)} in all)" if len(names) > MAX_LISTED_LABELS else ""
    blocks.append(_Para(f"Labels: {', '.join(names[:MAX_LISTED_LABELS])}{more}."))
    tol = result.plateau_tolerance
    best = max(taps, key=lambda t: t.accuracy) if taps else None
    best_text = f" tap ({best.name}, {best.accuracy:.3f})" if best is not None else ""
    reference = f"the best{best_text}"
    if getattr(result, "plateau_reference", "best_probe") == "model" and result.model_accuracy is not None:
        reference = (f"the model's accuracy ({result.model_accuracy:.3f}; the best{best_text} where no tap comes "
                     f"that close)")
    blocks.append(_Para(
        f"Plateau tap: {result.plateau}, the earliest tap within {tol:g} accuracy points "
        f"({tol / 100:g} in accuracy) of {reference}: layers after it add nothing to the probe accuracy."
    ))

    blocks += [_Heading(2, "Accuracy and filter statistics per tap"), _stats_table(result), _Para(_LEGEND)]
    blocks += published_blocks(result)
    if not taps:
        return blocks
    blocks += [_Heading(2, "Probe accuracy per tap"), _accuracy_figure(result)]
    blocks += [_Heading(2, "Noise and cluster size per tap"), _Para(_noise_trend(taps)),
               _noise_figure(taps, result.plateau)]

    blocks += [_Heading(2, "Signal and noise (Eqs. (1)-(4), Fig. 2)"), _Para(
        "Measured over labels from the clusters of each tap: signal = appearances of a label on the "
        "diagonal of its clusters, noise_I = other labels inside those clusters, noise_E = ones outside "
        "the clusters on the label's row, both per competing label (divided by K - 1); Boolean = clipped "
        "matrices, field = the raw fields at the same positions (per-label means of the images' fields; sums in "
        "analyses written before artifact format 3). SNR_I = signal / noise_I, SNR_E = signal / noise_E (means over labels)."
    ), _snr_table(taps)]
    estimates = _estimates_table(taps)
    if estimates is not None:
        blocks += [_Para("Estimates from the table averages (Eqs. (1)-(4); the signal, Eq. (1), is the mean number of "
                          "clusters a label is in, the paper's 'average appearance number of each label'):"), estimates]
    snr_tap = plateau if plateau is not None else taps[-1]
    if snr_tap.snr:
        blocks.append(_snr_figure(snr_tap, names, _file_stem(taps, snr_tap)))

    blocks.append(_Heading(2, "Clusters per tap (Fig. 5)"))
    for t in taps:
        blocks += [_Heading(3, t.name), _cluster_figure(t, names, _file_stem(taps, t))]

    blocks.append(_Heading(2, "Single-filter matrices (Figs. 3B and 4)"))
    for t in taps:
        blocks.append(_Heading(3, t.name))
        chosen = _pick_filters(t, filters_per_tap)
        if not chosen:
            blocks.append(_Para("No filter of this tap has a cluster." if filters_per_tap > 0 else "Not requested."))
        for c in chosen:
            blocks.append(_filter_figure(t, c, names, _file_stem(taps, t)))
    return blocks


_PUBLISHED_DIGITS = {"N_f": 0, "FC_s": 0, "accuracy": 3, "n": 2, "N_c": 2, "C_s": 2}


def published_blocks(result: AnalysisResult) -> list:
    """The papers' published values beside the measured ones, one table per published table that
    matches the setting (:mod:`compress.analysis.published`: model name, data set, K, tap names);
    nothing when none does."""
    matches = compare_result(result)
    if not matches:
        return []
    split = result.config.get("split", "test")
    width = (result.config.get("model") or {}).get("options", {}).get("width")
    blocks: list = [_Heading(2, "Published values beside these"), _Para(
        "Each cell: measured / published (measured - published). The setting matches a published table by "
        "architecture, data set and number of labels; a published layer m is this model's tap features.pool<m> "
        "(EfficientNet-B0's stage s: timm's bn1, blocks.1, blocks.2, blocks.3, blocks.5, bn2 for s = 1, 3, 4, 5, "
        "7, 9). "
        "The papers measured on the test split" + ("" if split == "test" else f"; these come from the {split} split")
        + (f"; the papers' networks are full width, this one has width {width:g}" if isinstance(width, (int, float))
           and width != 1 else "") + ".")]
    for table, rows in matches:
        cols = [c for c in ("N_f", "F_s", "FC_s", "accuracy", "n", "N_c", "C_s", *_PUBLISHED_SIZES)
                if any(c in r["columns"] for r in rows)]
        header = [table.unit.capitalize(), "tap", *[{"accuracy": "Accuracy"}.get(c, c) for c in cols]]
        body = [[str(r["layer"]), r["tap"] + ("" if r["analysed"] else " (not analysed)"),
                 *[_published_cell(c, r["columns"].get(c)) for c in cols]] for r in rows]
        text = f"{table.paper}, {table.source}: {table.architecture} on {table.dataset}, K = {table.k}."
        blocks += [_Heading(3, table.source), _Para(text + (f" {table.note}" if table.note else "")),
                   _Table(header, body)]
    return blocks


def _published_cell(column: str, cell: dict | None) -> str:
    if cell is None:
        return "-"
    digits = _PUBLISHED_DIGITS.get(column, 3)
    if column == "F_s":
        m = cell["measured"]
        return f"{m if m is not None else '-'} / {cell['published']}"
    m, p, d = cell["measured"], cell["published"], cell["difference"]
    text = f"{_fmt(m, digits)} / {_fmt(p, digits)}"
    return text + ("" if d is None else f" ({d:+.{digits}f})")


def _stats_table(result: AnalysisResult) -> _Table:
    header = ["Layer", "N_f", "F_s", "FC_s", "Accuracy", "n", "N_c", "C_s",
              *[str(s) for s in range(1, SIZE_COLUMNS + 1)], "no-cluster filters"]
    rows, marked = [], set()
    for i, t in enumerate(result.taps):
        s = t.stats
        frac = list(s.size_fractions[:SIZE_COLUMNS]) + [0.0] * max(0, SIZE_COLUMNS - len(s.size_fractions))
        name = t.name
        if t.name == result.plateau:
            name += " (plateau)"
            marked.add(i)
        rows.append([name, str(t.n_filters), t.filter_size, str(t.fc_size), _fmt(t.accuracy, 3),
                     _fmt(s.noise, 1), _fmt(s.clusters_per_filter, 2), _fmt(s.cluster_size, 2),
                     *[_fmt(f, 2) for f in frac], str(s.filters_without_cluster)])
    return _Table(header, rows, marked)


def _snr_table(taps: list[TapAnalysis]) -> _Table:
    header = ["Layer", "kind", "signal", "noise_I", "noise_E", "SNR_I", "SNR_E"]
    rows = []
    for t in taps:
        for kind in ("boolean", "field"):
            parts = t.snr.get(kind, {})
            signal, n_i, n_e = (_mean(parts.get(k)) for k in ("signal", "noise_internal", "noise_external"))
            rows.append([t.name, "Boolean" if kind == "boolean" else "field", _fmt(signal, 3), _fmt(n_i, 3),
                         _fmt(n_e, 3), _ratio(signal, n_i), _ratio(signal, n_e)])
    return _Table(header, rows)


def _estimates_table(taps: list[TapAnalysis]) -> _Table | None:
    keys: list[str] = []
    for t in taps:
        keys += [k for k in t.estimates if k not in keys]
    if not keys:
        return None
    rows = [[t.name, *[_fmt(t.estimates.get(k), 3, general=True) for k in keys]] for t in taps]
    return _Table(["Layer", *keys], rows)


def _noise_trend(taps: list[TapAnalysis]) -> str:
    text = "The papers find that the noise per filter n falls with depth while the accuracy rises."
    valid = [t for t in taps if math.isfinite(t.stats.noise)]
    if len(valid) >= 2:
        first, last = valid[0], valid[-1]
        verb = "falls" if last.stats.noise < first.stats.noise else "does not fall"
        text += (f" Here n goes from {first.stats.noise:.1f} at {first.name} "
                 f"to {last.stats.noise:.1f} at {last.name}: it {verb}.")
    return text


def _pick_filters(tap: TapAnalysis, count: int) -> list[int]:
    """Filters with the most labels in clusters first (ties by index), skipping cluster-less ones."""
    labelled = (np.asarray(tap.cluster_ids) >= 0).sum(axis=1)
    order = sorted((c for c in range(len(labelled)) if labelled[c] > 0), key=lambda c: (-labelled[c], c))
    return order[: max(0, count)]


# ----------------------------------------------------------------------------- figures


def _accuracy_figure(result: AnalysisResult) -> _Figure:
    taps = result.taps
    x = np.arange(len(taps))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(taps) + 3), 3.6))
    ax.plot(x, [t.accuracy for t in taps], "o-", color="tab:blue", label="probe test accuracy")
    ax.plot(x, [t.train_accuracy for t in taps], "s--", color="tab:gray", ms=4, label="probe train accuracy")
    if result.model_accuracy is not None:
        ax.axhline(result.model_accuracy, color="tab:green", ls=":", label="model test accuracy")
    for i, t in enumerate(taps):
        if t.name == result.plateau:
            ax.plot([i], [t.accuracy], "*", color="tab:red", ms=16, label="plateau", zorder=3)
            ax.axvline(i, color="tab:red", ls="--", lw=0.8)
    _tap_ticks(ax, taps)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, "accuracy", "Probe accuracy per tap, in network order; the star marks the plateau tap.")


def _noise_figure(taps: list[TapAnalysis], plateau: str) -> _Figure:
    x = np.arange(len(taps))
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8.0, 1.4 * len(taps) + 5), 3.6))
    a.plot(x, [t.stats.noise for t in taps], "o-", color="tab:orange")
    a.set_ylabel("n (noise per filter)")
    b.plot(x, [t.stats.cluster_size for t in taps], "o-", color="tab:blue", label="C_s (cluster size)")
    b.plot(x, [t.stats.clusters_per_filter for t in taps], "s--", color="tab:purple", label="N_c (clusters/filter)")
    b.legend(fontsize=8)
    a.set_title("noise per filter n", fontsize=10)
    b.set_title("cluster size C_s and clusters per filter N_c", fontsize=10)
    for ax in (a, b):
        _tap_ticks(ax, taps)
        ax.grid(alpha=0.3)
        for i, t in enumerate(taps):
            if t.name == plateau:
                ax.axvline(i, color="tab:red", ls="--", lw=0.8)
    return _save(fig, "noise_cluster_size",
                 "Left: noise per filter n per tap. Right: C_s and N_c per tap. Dashed red line: plateau tap.")


def _snr_figure(tap: TapAnalysis, names: list[str], stem: str) -> _Figure:
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    x = np.arange(len(names))
    for ax, kind, title in zip(axes, ("boolean", "field"), ("A. Boolean (clipped)", "B. field")):
        parts = tap.snr.get(kind, {})
        zeros = np.zeros(len(names))
        signal = np.asarray(parts.get("signal", zeros), dtype=float)
        n_i = np.asarray(parts.get("noise_internal", zeros), dtype=float)
        n_ie = n_i + np.asarray(parts.get("noise_external", zeros), dtype=float)
        for y, color, label in ((signal, "tab:blue", "signal"), (n_i, "tab:red", "noise_I"),
                                (n_ie, "tab:orange", "noise_I + noise_E")):
            ax.plot(x, y, "o-", color=color, ms=3, lw=1, label=f"{label} (mean {np.mean(y):.3g})")
            ax.axhline(np.mean(y), color=color, ls="--", lw=0.8)
        ax.set_title(title, fontsize=10)
        _label_axis(ax, names, "x")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(_mpl(f"Signal and noise per label at {tap.name}"), fontsize=10)
    return _save(fig, f"snr_{stem}",
                 f"Fig. 2 style: signal, noise_I and noise_I + noise_E per label at {tap.name}; dashed lines: means.")


def _cluster_figure(tap: TapAnalysis, names: list[str], stem: str) -> _Figure:
    ids = np.asarray(tap.cluster_ids)
    n_filters, k = ids.shape
    flat = (ids + np.arange(n_filters)[:, None] * k)[ids >= 0]
    sizes = np.bincount(flat, minlength=n_filters * k)
    hist = np.bincount(sizes[sizes > 0], minlength=2)[1:]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    if hist.sum():
        a.bar(np.arange(1, len(hist) + 1), hist, color="tab:blue")
        a.set_xticks(np.arange(1, len(hist) + 1))
    else:
        a.text(0.5, 0.5, "no clusters", ha="center", va="center", transform=a.transAxes)
        a.set_xticks([])
        a.set_yticks([])
    a.set_xlabel("cluster size")
    a.set_ylabel("clusters")
    counts = np.asarray(tap.stats.label_counts, dtype=float)
    b.bar(np.arange(len(counts)), counts, color="tab:green")
    b.axhline(counts.mean() if counts.size else 0.0, color="tab:red", ls="--", label="mean")
    b.set_ylabel("clusters containing the label")
    _label_axis(b, names, "x")
    b.legend(fontsize=8)
    fig.suptitle(_mpl(tap.name), fontsize=10)
    return _save(fig, f"clusters_{stem}",
                 f"{tap.name}: number of clusters by size (left) and label appearances in clusters (right).")


def _filter_figure(tap: TapAnalysis, c: int, names: list[str], stem: str) -> _Figure:
    clusters = tap.clusters(c)
    placed = [i for cl in clusters for i in cl]
    if len(names) <= MAX_MATRIX_LABELS:  # every label, in index order (the permuted panel: clusters first)
        shown, order = list(range(len(names))), placed + [i for i in range(len(names)) if i not in set(placed)]
    else:  # only the labels of the filter's clusters, in cluster order: a K x K image shows nothing at K = 1,000
        shown = order = placed[:MAX_MATRIX_LABELS]
    ids = np.asarray(tap.cluster_ids[c])
    clipped = np.asarray(tap.clipped[c], dtype=bool)
    in_cluster = (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)
    codes = np.where(clipped, np.where(in_cluster, 1, 2), 0)
    sub = np.ix_(shown, shown)

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    _matrix_panel(fig, axes[0], None if tap.normalized is None else np.asarray(tap.normalized[c])[sub],
                  "viridis", "fields not saved (save_fields)")
    axes[1].imshow(clipped[sub], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[2].imshow(codes[np.ix_(order, order)], cmap=_PERMUTED_CMAP, vmin=0, vmax=2, interpolation="nearest")
    offset = 0
    for cl in clusters:  # outline blocks of two labels or more; singletons are plain white squares
        if len(cl) > 1 and offset + len(cl) <= len(order):
            axes[2].add_patch(Rectangle((offset - 0.5, offset - 0.5), len(cl), len(cl), fill=False, ec="red", lw=1))
        offset += len(cl)
    decision = tap.decision
    computed = decision is not None and (not hasattr(decision, "filters") or c in decision)
    _matrix_panel(fig, axes[3], np.asarray(decision[c])[sub] if computed else None, "Blues",
                  "not computed (decision)", vmin=0)
    titles = ("(a) normalized fields", f"(b) clipped > {tap.threshold:g}", "(c) permuted: clusters, noise",
              "(d) decision matrix (Fig. 3B)")
    sub_names = [names[i] for i in shown]
    for j, (ax, title) in enumerate(zip(axes, titles)):
        ax.set_title(title, fontsize=9)
        _label_axis(ax, sub_names, "both", [shown.index(i) for i in order] if j == 2 else None)
        ax.set_xlabel("output unit", fontsize=8)
        ax.set_ylabel("true label", fontsize=8)
    fig.suptitle(_mpl(f"{tap.name}, filter {c}"), fontsize=10)
    described = "; ".join("{" + ", ".join(names[i] for i in cl) + "}" for cl in clusters)
    caption = (f"{tap.name}, filter {c}: {len(clusters)} cluster(s) {described}; noise {int(tap.noise[c])} "
               f"(yellow in (c)).")
    if len(shown) < len(names):
        caption += (f" Only the {len(shown)} labels of the clusters are drawn (of {len(names)}); "
                    f"noise ones in other rows and columns are not shown.")
    return _save(fig, f"filter_{stem}_{c}", caption)


def _matrix_panel(fig, ax, matrix: np.ndarray | None, cmap: str, missing: str, vmin: float | None = None) -> None:
    """A matrix with its colour bar, or a note where the artifact does not hold it."""
    if matrix is None:
        ax.text(0.5, 0.5, missing, ha="center", va="center", fontsize=8, transform=ax.transAxes)
        return
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def _tap_ticks(ax, taps: list[TapAnalysis]) -> None:
    ax.set_xticks(np.arange(len(taps)))
    ax.set_xticklabels([_mpl(t.name) for t in taps], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("tap (network order)")


def _label_axis(ax, names: list[str], which: str, order: list[int] | None = None) -> None:
    """Label names as ticks when there are few labels, otherwise no per-label ticks."""
    k = len(names)
    idx = order if order is not None else list(range(k))
    many = k > MAX_TICK_LABELS
    text = [] if many else [_mpl(names[i]) for i in idx]
    ticks = [] if many else list(range(k))
    if which in ("x", "both"):
        ax.set_xticks(ticks)
        ax.set_xticklabels(text, rotation=90, fontsize=7)
    if which == "both":
        ax.set_yticks(ticks)
        ax.set_yticklabels(text, fontsize=7)
    elif many:
        ax.set_xlabel("label (index order)")


def _file_stem(taps: list[TapAnalysis], tap: TapAnalysis) -> str:
    """A file-name-safe, unique stem for a tap: its position plus its sanitized name."""
    i = next(j for j, t in enumerate(taps) if t is tap)
    return f"{i:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', tap.name).strip('.') or 'tap'}"


# ----------------------------------------------------------------------------- formatting


def _mpl(text: str) -> str:
    """Keep user text literal in matplotlib (no mathtext on ``$``)."""
    return str(text).replace("$", r"\$")


def _mean(values) -> float:
    return float(np.mean(values)) if values is not None and np.size(values) else math.nan


def _fmt(value, digits: int, general: bool = False) -> str:
    if value is None:
        return "-"
    value = float(value)
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}" if general else f"{value:.{digits}f}"


def _ratio(num: float, den: float) -> str:
    if math.isnan(num) or math.isnan(den):
        return "-"
    if den == 0:
        return "inf" if num > 0 else "-"
    return f"{num / den:.2f}"


