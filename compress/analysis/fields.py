"""Phase 3 matrices: per-filter output fields, decision matrices, normalisation and clipping."""

from __future__ import annotations

import torch

from compress import distributed

__all__ = ["field_matrices", "normalize_fields", "clip_fields"]


@torch.inference_mode()
def field_matrices(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, num_classes: int,
                   batch_size: int = 1000, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every filter's K x K field matrix and decision matrix, without a forward pass per filter.

    Filter c's field on output j for input n is ``sum_hw W[j, c, h, w] * a[n, c, h, w]``: the
    probe's output when every weight but filter c's is silenced. One einsum gives it for all
    filters; ``index_add`` sums it per true label.

    Under ``torchrun`` every process passes the same ``features`` and sums only its contiguous
    block of rows; the per-class sums and decision counts are then added across processes, so
    every process returns the matrices of the whole set.

    Args:
        features: (N, C, H, W) tap outputs of the test inputs (any float dtype, may be memory-mapped).
        labels: (N,) true labels.
        weight: probe weight, (K, C*H*W) or (K, C, H, W).
        num_classes: K.
        batch_size: inputs per chunk.
        device: where to compute (default: CUDA when present).

    Returns:
        ``fields`` (C, K, K) float64, summed fields (row = true label, column = output unit), and
        ``decision`` (C, K, K) float64, Fig. 3B: for each true label, the fraction of its inputs
        for which the filter's largest field is on each output; inputs whose fields are all zero
        for that filter are left out.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n, c = features.shape[0], features.shape[1]
    k = num_classes
    w = weight.reshape(k, *features.shape[1:]).to(device, torch.float32)
    sums = torch.zeros(k, c, k, dtype=torch.float64, device=device)
    counts = torch.zeros(k * c * k, dtype=torch.float64, device=device)
    filt = torch.arange(c, device=device).view(1, -1)
    first, last = distributed.shard_range(n)
    for start in range(first, last, batch_size):
        stop = min(last, start + batch_size)
        a = features[start:stop].to(device, torch.float32)
        y = labels[start:stop].to(device)
        f = torch.einsum("nc...,kc...->nck", a, w)  # (n, C, K)
        sums.index_add_(0, y, f.double())
        nonzero = (f != 0).any(2)  # (n, C)
        flat = (y.view(-1, 1) * c + filt) * k + f.argmax(2)
        counts += torch.bincount(flat.flatten(), weights=nonzero.flatten().double(), minlength=k * c * k)
    distributed.all_reduce_sum(sums)
    distributed.all_reduce_sum(counts)
    fields = sums.permute(1, 0, 2).contiguous()
    counts = counts.view(k, c, k).permute(1, 0, 2)
    decision = counts / counts.sum(2, keepdim=True).clamp_min(1)
    return fields.cpu(), decision.cpu()


def normalize_fields(fields: torch.Tensor) -> torch.Tensor:
    """Divide each filter's matrix by its maximum element; a filter whose maximum is not positive
    (a dead filter) gets an all-zero matrix."""
    peak = fields.amax((1, 2), keepdim=True)
    return torch.where(peak > 0, fields / peak.clamp_min(torch.finfo(fields.dtype).tiny), torch.zeros_like(fields))


def clip_fields(normalized: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean matrices: True where the normalised field exceeds ``threshold``."""
    if not 0.0 < threshold < 1.0:
        from compress.errors import UserError

        raise UserError(f"threshold {threshold} is outside (0, 1); the papers use 0.3 (robust in 0.3-0.6)")
    return normalized > threshold
