"""Phase 3 matrices: per-filter output fields, decision matrices, normalisation and clipping.

Filter c's field on output j for input n is ``sum_hw W[j, c, h, w] * a[n, c, h, w]``, and the
field matrix sums it over the inputs into row = true label. The sum over inputs and the sum
over positions commute, so the tap's features are summed per true label once
(:func:`class_sums`, an ``index_add`` over the images, O(N C H W)) and one contraction with the
probe weight gives every filter's K x K matrix (:func:`fields_from_sums`, O(C K^2 H W)), never
an (images, C, K) tensor. Only the decision matrices of Fig. 3B need the per-image argmax;
:func:`decision_matrices` computes them in bounded chunks of filters and images.

:func:`scan_fields` runs the rest of phase 3 (normalise, clip, clusters, noise, SNR sums) chunk
by chunk over the filters, so that its dense (c, K, K) temporaries stay within a byte budget
and only the bit-packed clipped matrices and (C, K) or (C,) summaries are kept for the tap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from compress import distributed
from compress.analysis.clusters import CHUNK_BYTES, filter_chunks, find_clusters_batched
from compress.analysis.result import PackedMatrices, SparseMatrices, pack_rows
from compress.analysis.stats import snr_from_sums, snr_sums_add_rows, snr_sums_zero

__all__ = ["field_matrices", "normalize_fields", "clip_fields", "class_sums", "fields_from_sums",
           "decision_matrices", "decision_filters", "scan_fields", "FieldScan", "AUTO_MAX_LABELS"]

AUTO_MAX_LABELS = 100  # decision matrices and fields are kept by default up to this many labels
_TIES = 4  # weights multiplied per input by the one-position shortcut of the decision matrices
_SCAN_BYTES_PER_ENTRY = 48  # dense bytes per (label, output) entry of one filter in a scan chunk


def _device(device) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@torch.inference_mode()
def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int, budget: int = CHUNK_BYTES,
               device: torch.device | str | None = None) -> torch.Tensor:
    """(K, C, H*W) float64: the tap's features summed per true label.

    Chunks of about ``8 K`` images are summed per label in float32 straight from the features
    (about 8 images per label and chunk, so the relative rounding error stays near 1e-7, as
    with the float32 per-image fields before), and the chunks' sums are added in float64.
    Under ``torchrun`` every process sums its contiguous block of whole chunks and the sums are
    added across processes (in float64), so every process returns the sums of the whole set,
    equal to a single process's up to float64 rounding.

    Args:
        features: (N, C, H, W) or (N, C) tap outputs (any float dtype, may be memory-mapped).
        labels: (N,) true labels.
        num_classes: K.
        budget: bytes of one chunk of images in float32.
        device: where to sum (default: CUDA when present).
    """
    device = _device(device)
    n, c = features.shape[0], features.shape[1]
    d = features[0].numel()
    sums = torch.zeros(num_classes, d, dtype=torch.float64, device=device)
    partial = torch.zeros(num_classes, d, dtype=torch.float32, device=device)
    step = max(1, min(budget // (4 * d), max(64, 8 * num_classes)))
    first, last = distributed.shard_range(n, step)  # whole chunks: the same float32 sums in every layout
    for start in range(first, last, step):
        stop = min(last, start + step)
        a = features[start:stop].reshape(stop - start, d).to(device, torch.float32)
        sums += partial.zero_().index_add_(0, labels[start:stop].to(device), a)
    distributed.all_reduce_sum(sums)
    return sums.view(num_classes, c, d // c).cpu()


def fields_from_sums(sums: torch.Tensor, weight: torch.Tensor, filters: slice | torch.Tensor = slice(None), *,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """(c, K, K) float64 field matrices of ``filters`` from :func:`class_sums` and the probe weight.

    ``fields[c, i, j] = sum_hw sums[i, c, hw] * W[j, c, hw]``: row = true label, column = output.
    ``out``, if given, is a contiguous (c, K, K) float64 tensor to write them into.
    """
    k, c, s = sums.shape
    w = weight.reshape(k, c, s)[:, filters].to(torch.float64)
    return torch.bmm(sums[:, filters].permute(1, 0, 2), w.permute(1, 2, 0), out=out)


@torch.inference_mode()
def _decision_codes(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, num_classes: int,
                    filters: torch.Tensor, budget: int, device: torch.device | str | None) -> torch.Tensor:
    """(N, F) int64: ``1 + true label * K + output of the largest field`` of each image for each
    filter of ``filters`` (the first output on ties, as ``argmax``), or 0 where all its fields
    are zero. The fields are computed in float32 for as many images at a time as fit ``budget``
    bytes; under ``torchrun`` each process fills its block of rows and the codes are summed."""
    device = _device(device)
    n, c = features.shape[0], features.shape[1]
    k, f = num_classes, len(filters)
    w = weight.reshape(k, c, -1)[:, filters].to(device, torch.float32)
    ends = _sorted_ends(w) if w.shape[2] == 1 else None
    contiguous = bool((filters == torch.arange(int(filters[0]), int(filters[0]) + f)).all()) if f else False
    span = slice(int(filters[0]), int(filters[0]) + f) if contiguous else None
    codes = torch.zeros(n, f, dtype=torch.long)
    step = max(1, budget // (f * (k if ends is None else _TIES) * 8 + features[0].numel() * 4))
    first, last = distributed.shard_range(n)
    for start in range(first, last, step):
        stop = min(last, start + step)
        a = features[start:stop].reshape(stop - start, c, -1)
        a = a[:, span] if span is not None else a.index_select(1, filters.to(features.device))
        a = a.to(device, torch.float32)
        top, nonzero = _largest_field(a, w) if ends is None else _largest_field_1x1(a[..., 0], w[..., 0], ends)
        code = labels[start:stop].to(device).view(-1, 1) * k + top + 1
        codes[start:stop] = torch.where(nonzero, code, 0).cpu()
    distributed.all_reduce_sum(codes)
    return codes


def _largest_field(a: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, F) output of the first largest field of inputs ``a`` (n, F, S) through weights ``w``
    (K, F, S), as ``argmax``, and (n, F) whether any field is non-zero."""
    fld = torch.einsum("ncs,kcs->nck", a, w)  # (n, F, K)
    peak, top = fld.max(2)  # the first largest field, as argmax
    nonzero = peak != 0
    unsure = torch.nonzero(~nonzero).T  # largest field 0: is any other field not 0?
    nonzero[unsure[0], unsure[1]] = (fld[unsure[0], unsure[1]] != 0).any(1)
    return top, nonzero


def _sorted_ends(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The :data:`_TIES` largest and smallest weights of each filter (one position, ``w`` (K, F, 1))
    and their outputs, each (T, F)."""
    t = min(_TIES, w.shape[0])
    down = torch.sort(w[..., 0], dim=0, descending=True, stable=True)
    up = torch.sort(w[..., 0], dim=0, stable=True)
    return down.values[:t], down.indices[:t], up.values[:t], up.indices[:t]


def _largest_field_1x1(x: torch.Tensor, w: torch.Tensor,
                       ends: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_largest_field` for one position per filter, in O(n F) instead of O(n F K).

    The field ``x * w[j]`` (one rounding, as in the einsum) is monotone in ``w[j]``: its largest
    value is at the largest weight for x > 0 and at the smallest for x < 0, and the outputs tied
    with it are a prefix of the weights sorted that way. Only :data:`_TIES` weights of that end
    are multiplied; inputs whose ties run past them, or whose largest field is 0 while x is
    not, are redone over all K outputs. Same result as the full computation.

    Args:
        x: (n, F) inputs.
        w: (K, F) weights.
        ends: :func:`_sorted_ends` of ``w``.
    """
    down_v, down_i, up_v, up_i = ends
    positive = x > 0
    peak = x * torch.where(positive, down_v[0], up_v[0])
    top = torch.where(positive, down_i[0], up_i[0])
    tied = torch.ones_like(positive)  # so far every candidate ties with the largest field
    for t in range(1, len(down_v)):  # a few candidates, each one (n, F) operation
        tied &= x * torch.where(positive, down_v[t], up_v[t]) == peak
        top = torch.where(tied, torch.minimum(top, torch.where(positive, down_i[t], up_i[t])), top)
    nonzero = peak != 0
    redo = torch.nonzero((tied | ~nonzero) & (x != 0)).T
    if redo.numel():
        full = x[redo[0], redo[1]].unsqueeze(1) * w[:, redo[1]].T  # (m, K)
        top[redo[0], redo[1]] = full.max(1).indices
        nonzero[redo[0], redo[1]] = (full != 0).any(1)
    return top, nonzero


def decision_matrices(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, num_classes: int,
                      filters: torch.Tensor | None = None, budget: int = CHUNK_BYTES,
                      device: torch.device | str | None = None) -> SparseMatrices:
    """Fig. 3B decision matrices of ``filters`` (default: all), rows normalised, kept sparse.

    For each filter and true label, the fraction of the label's inputs whose largest
    single-filter field is on each output; inputs whose fields are all zero for that filter are
    left out. Computed for chunks of filters whose (N, F) per-image codes fit ``budget``; the
    counts come from ``torch.unique`` of the codes, so no dense (F, K, K) array is made.
    """
    n, c, k = features.shape[0], features.shape[1], num_classes
    filters = torch.arange(c) if filters is None else torch.as_tensor(filters, dtype=torch.long).sort().values
    index, values = [], []
    for part in filter_chunks(len(filters), 32 * n, budget):
        codes = _decision_codes(features, labels, weight, k, filters[part], budget, device)
        offset = torch.arange(part.start, part.stop).view(1, -1) * k * k - 1
        keys, counts = torch.unique((codes + offset)[codes > 0], return_counts=True)  # sorted
        rows = keys // k - part.start * k  # (filter, true label) within the chunk
        totals = torch.bincount(rows, weights=counts.double(), minlength=(part.stop - part.start) * k)
        index.append(keys.numpy())
        values.append((counts.double() / totals[rows]).float().numpy())
    return SparseMatrices(filters.numpy(), np.concatenate(index or [np.zeros(0, np.int64)]),
                          np.concatenate(values or [np.zeros(0, np.float32)]), c, k)


def decision_filters(spec: str, cluster_ids: torch.Tensor) -> torch.Tensor | None:
    """The filters whose decision matrices ``spec`` asks for (``AnalysisConfig.decision``).

    ``all``: every filter; ``none``: None; ``sample:N``: the N filters with the most labels in
    clusters, ties by index (the filters the report shows first); ``auto``: all up to
    :data:`AUTO_MAX_LABELS` labels, none above.
    """
    ids = torch.as_tensor(cluster_ids)
    c, k = ids.shape
    if spec == "auto":
        spec = "all" if k <= AUTO_MAX_LABELS else "none"
    if spec == "none":
        return None
    if spec == "all":
        return torch.arange(c)
    n = int(spec.split(":", 1)[1])
    order = torch.sort((ids >= 0).sum(1), descending=True, stable=True).indices
    return order[:n].sort().values


@torch.inference_mode()
def field_matrices(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, num_classes: int,
                   batch_size: int = 1000,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every filter's K x K field matrix and decision matrix, as dense arrays.

    For a tap of many filters at large K use :func:`scan_fields` and :func:`decision_matrices`,
    which keep only chunks of these arrays. Under ``torchrun`` every process returns the
    matrices of the whole set (see :func:`class_sums`).

    Args:
        features: (N, C, H, W) tap outputs of the test inputs (any float dtype, may be memory-mapped).
        labels: (N,) true labels.
        weight: probe weight, (K, C*H*W) or (K, C, H, W).
        num_classes: K.
        batch_size: inputs per chunk of the decision counts.
        device: where to compute (default: CUDA when present).

    Returns:
        ``fields`` (C, K, K) float64, summed fields (row = true label, column = output unit), and
        ``decision`` (C, K, K) float64, Fig. 3B: for each true label, the fraction of its inputs
        for which the filter's largest field is on each output; inputs whose fields are all zero
        for that filter are left out.
    """
    c = features.shape[1]
    sums = class_sums(features, labels, num_classes, device=device)
    fields = fields_from_sums(sums, weight)
    per_batch = batch_size * (c * num_classes * 8 + features[0].numel() * 4)
    decision = decision_matrices(features, labels, weight, num_classes, None, max(per_batch, 32 * len(features) * c),
                                 device)
    return fields, torch.from_numpy(np.asarray(decision)).double()


def normalize_fields(fields: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Divide each filter's matrix by its maximum element; a filter whose maximum is not positive
    (a dead filter) gets an all-zero matrix. ``out``: an optional tensor to write into."""
    peak = fields.reshape(len(fields), -1).max(1).values.view(-1, 1, 1)
    out = torch.div(fields, peak.clamp_min(torch.finfo(fields.dtype).tiny), out=out)
    dead = ~(peak > 0)
    return out.masked_fill_(dead, 0.0) if dead.any() else out


def clip_fields(normalized: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean matrices: True where the normalised field exceeds ``threshold``."""
    if not 0.0 < threshold < 1.0:
        from compress.errors import UserError

        raise UserError(f"threshold {threshold} is outside (0, 1); the papers use 0.3 (robust in 0.3-0.6)")
    return normalized > threshold


@dataclass
class FieldScan:
    """What :func:`scan_fields` keeps of a tap's (C, K, K) matrices.

    Attributes:
        clipped: the clipped matrices, bit-packed.
        cluster_ids: (C, K) int64 cluster index per label, -1 for none.
        noise: (C,) int64 ones outside the clusters.
        snr: :func:`compress.analysis.stats.label_snr` of the whole tap.
        cluster_fields: (C,) float64 raw fields summed inside each filter's clusters.
        fields: (C, K, K) raw fields in the kept dtype, or None.
        normalized: (C, K, K) normalised fields in the kept dtype, or None.
    """

    clipped: PackedMatrices
    cluster_ids: torch.Tensor
    noise: torch.Tensor
    snr: dict[str, dict[str, torch.Tensor]]
    cluster_fields: torch.Tensor
    fields: np.ndarray | None = None
    normalized: np.ndarray | None = None


def scan_fields(sums: torch.Tensor, weight: torch.Tensor, threshold: float, keep: str | None = None,
                budget: int = CHUNK_BYTES) -> FieldScan:
    """Phase 3 of one tap from its class sums, in chunks of filters.

    Each chunk's field matrices are computed, normalised, clipped, bit-packed and searched for
    clusters; its noise and SNR sums come from (c, K) row summaries (the ones and the fields
    summed per row, and the fields summed over each label's cluster, which the class sums give
    without the matrices); then the chunk is dropped. Clusters, noise and the clipped matrices
    are identical to running each step on the whole (C, K, K) stack.

    Args:
        sums: (K, C, H*W) from :func:`class_sums`.
        weight: probe weight, (K, C*H*W) or (K, C, H, W).
        threshold: clipping threshold in (0, 1).
        keep: ``"float32"`` or ``"float16"`` to keep the raw and normalised fields in that dtype,
            None to drop them.
        budget: bytes of dense temporaries per chunk of filters.
    """
    k, c, s = sums.shape
    w = weight.reshape(k, c, s).to(torch.float64)
    bits = np.zeros((c, k, (k + 7) // 8), dtype=np.uint8)
    ids, noise = torch.full((c, k), -1, dtype=torch.long), torch.zeros(c, dtype=torch.long)
    strength, acc = torch.zeros(c, dtype=torch.float64), snr_sums_zero(k)
    kept = {name: np.zeros((c, k, k), dtype=keep) for name in ("fields", "normalized")} if keep else {}
    groups = filter_chunks(c, 4 * k * k, budget)  # the cluster search runs on a group of chunks at once
    step = filter_chunks(groups[0].stop, _SCAN_BYTES_PER_ENTRY * k * k, budget)[0].stop
    work = torch.empty(3, step, k, k, dtype=torch.float64), torch.empty(groups[0].stop, k, k, dtype=torch.bool)
    for group in groups:
        clipped, row_fields = _clip_group(sums, w, group, threshold, work, kept)
        bits[group] = pack_rows(clipped.numpy())
        ids[group] = find_clusters_batched(clipped, budget)
        inside, diag = _cluster_rows(sums[:, group], w[:, group], ids[group])
        noise[group] = snr_sums_add_rows(acc, ids[group], _row_ones(bits[group], clipped), row_fields, diag, inside)
        strength[group] = inside.sum(1)
    return FieldScan(clipped=PackedMatrices(bits, k), cluster_ids=ids, noise=noise, snr=snr_from_sums(acc, k),
                     cluster_fields=strength, fields=kept.get("fields"), normalized=kept.get("normalized"))


def _clip_group(sums: torch.Tensor, w: torch.Tensor, group: slice, threshold: float,
                work: tuple[torch.Tensor, torch.Tensor],
                kept: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (g, K, K) clipped matrices of a group of filters and their (g, K) fields summed over
    each row's ones. The float64 fields are computed in chunks of filters into ``work`` (three
    (step, K, K) float64 buffers and a (g, K, K) bool one, reused so that big temporaries are
    not allocated and page-faulted again per chunk) and copied into ``kept``, if any."""
    floats, flags = work
    n, step = group.stop - group.start, floats.shape[1]
    clipped = flags[:n]
    row_fields = torch.empty(n, sums.shape[0], dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    for lo in range(0, n, step):
        part = slice(lo, min(n, lo + step))
        filters = slice(group.start + part.start, group.start + part.stop)
        fields, normalized, masked = floats[:, : part.stop - part.start]
        fields_from_sums(sums, w, filters, out=fields)
        normalize_fields(fields, out=normalized)
        torch.gt(normalized, threshold, out=clipped[part])
        row_fields[part] = torch.where(clipped[part], fields, zero, out=masked).sum(2)
        for name, value in (("fields", fields), ("normalized", normalized)):
            if name in kept:
                kept[name][filters] = value.numpy()
    return clipped, row_fields


def _cluster_rows(sums: torch.Tensor, w: torch.Tensor, cluster_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, K) fields of each row summed over its label's cluster (0 for labels in none) and (c, K)
    diagonal fields, from (K, c, S) class sums and float64 probe weights: the weights of each
    cluster's outputs are summed first (``scatter_add``), O(c K S) instead of O(c K^2)."""
    a, wc = sums.permute(1, 0, 2), w.permute(1, 0, 2)  # (c, K, S)
    slot = (cluster_ids + 1).unsqueeze(2).expand(-1, -1, a.shape[2])  # slot 0: no cluster
    per_cluster = torch.zeros(a.shape[0], a.shape[1] + 1, a.shape[2], dtype=torch.float64).scatter_add_(1, slot, wc)
    inside = (a * per_cluster.gather(1, slot)).sum(2)
    return torch.where(cluster_ids >= 0, inside, 0.0), (a * wc).sum(2)


def _row_ones(bits: np.ndarray, clipped: torch.Tensor) -> torch.Tensor:
    """(c, K) ones per row, counted on the packed bits where numpy can (numpy >= 2)."""
    if hasattr(np, "bitwise_count"):
        return torch.from_numpy(np.bitwise_count(bits).sum(-1, dtype=np.int64))
    return clipped.sum(2)
