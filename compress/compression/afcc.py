"""AFCC (applied filter's cluster connections): masks that keep only the connections from each
filter to the labels of its clusters, the step hook that keeps them zero while fine-tuning, and
the compact head that stores the kept connections only.

The papers (Meir, Tzach et al., "Universality of underlying mechanism...", Discussion and
Methods) zero every FC weight from filter ``c`` to an output label that is in none of ``c``'s
clusters, then fine-tune the FC layer (or the FC layer and the last conv stage) a few epochs
with the zeroed weights held at zero. The kept count is estimated as ``N_f * F_s * C_s * N_c``.

Two forms of the same pruning:

- a boolean mask on a dense layer (:func:`apply_mask`, :class:`MaskKeeper`), for fine-tuning
  with :func:`compress.training.fit` and for hidden FC and conv-to-conv masks;
- :class:`SparseHead`, which replaces the output ``nn.Linear`` with only the kept
  ``(filter, label)`` blocks, so model files and ONNX exports shrink
  (:func:`compress_head`, replayed from the model file by the ``afcc`` transform).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from compress.errors import UserError, unknown_name
from compress.models.transforms import record_transform, register_transform
from compress.models.introspect import get_module, set_module

if TYPE_CHECKING:
    from compress.analysis.result import TapAnalysis

__all__ = ["afcc_mask", "count_kept", "papers_estimate", "apply_mask", "MaskKeeper", "select_trainable",
           "SparseHead", "compress_head", "label_sets", "fc_mask_from_labels", "conv_mask_from_labels",
           "afcc_report"]


# ----------------------------------------------------------------------------------- masks


def afcc_mask(cluster_ids: np.ndarray | torch.Tensor, spatial: tuple[int, int]) -> torch.Tensor:
    """The AFCC mask of a head fed by a tap's flattened (C, H, W) output.

    Args:
        cluster_ids: (C, K) cluster index of each label in each filter, -1 for none
            (:attr:`TapAnalysis.cluster_ids`).
        spatial: (H, W) of the tap.

    Returns:
        Bool (K, C*H*W): True where label ``j`` is in any cluster of filter ``c``, for every
        position of ``c``'s H*W block.
    """
    keep = torch.as_tensor(cluster_ids).cpu() >= 0  # (C, K)
    c, k = keep.shape
    hw = int(spatial[0]) * int(spatial[1])
    return keep.t().unsqueeze(-1).expand(k, c, hw).reshape(k, c * hw).contiguous()


def count_kept(mask: torch.Tensor) -> int:
    """Number of True entries (kept weights) of ``mask``."""
    return int(torch.as_tensor(mask).sum())


def papers_estimate(tap: TapAnalysis) -> float:
    """The papers' estimate of the kept head weights, ``N_f * F_s * C_s * N_c``.

    ``N_f`` counts every filter of the tap, ``F_s = H * W``; ``C_s`` and ``N_c`` are the tap's
    averages (``N_c`` over filters with at least one cluster, as in the papers' tables). A
    filter's clusters are disjoint, so the estimate equals :func:`count_kept` of
    :func:`afcc_mask` when every filter has a cluster, and overshoots it by the factor
    ``N_f / (N_f - filters without cluster)`` otherwise.
    """
    h, w = tap.spatial
    return float(tap.n_filters * h * w * tap.stats.cluster_size * tap.stats.clusters_per_filter)


def label_sets(cluster_ids: np.ndarray | torch.Tensor) -> list[set[int]]:
    """The labels in any cluster of each filter: one set per row of the (C, K) ``cluster_ids``."""
    ids = np.asarray(cluster_ids)
    rows, cols = np.nonzero(ids >= 0)
    out: list[set[int]] = [set() for _ in range(ids.shape[0])]
    for r, j in zip(rows.tolist(), cols.tolist()):
        out[r].add(j)
    return out


def _incidence(sets: Sequence[set[int]], k: int) -> torch.Tensor:
    """(len(sets), k) float 0/1 matrix: row i has ones at the labels of ``sets[i]``."""
    rows = [i for i, s in enumerate(sets) for _ in s]
    cols = [j for s in sets for j in s]
    a = torch.zeros(len(sets), k)
    a[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = 1.0
    return a


def fc_mask_from_labels(in_labels: Sequence[set[int]], out_labels: Sequence[set[int]]) -> torch.Tensor:
    """Mask of a hidden FC layer: keep the connection between two units that share a cluster label.

    The result is applied to the dense weight with :func:`apply_mask` / :class:`MaskKeeper`
    (zeros in a dense matrix; nothing is removed from the file). For an FC layer fed by a
    flattened (C, H, W) tap, repeat each filter's set H*W times to get one set per input unit.

    Args:
        in_labels: the label set of each input unit.
        out_labels: the label set of each output unit.

    Returns:
        Bool (len(out_labels), len(in_labels)), the shape of ``nn.Linear.weight``.
    """
    k = 1 + max((max(s) for s in (*in_labels, *out_labels) if s), default=-1)
    return (_incidence(out_labels, k) @ _incidence(in_labels, k).t()) > 0


def conv_mask_from_labels(in_filter_labels: Sequence[set[int]], out_filter_labels: Sequence[set[int]],
                          kernel_size: int | tuple[int, int]) -> torch.Tensor:
    """Mask of a conv layer: keep the kernel from input filter ``i`` to output filter ``o`` when
    their label sets (each filter's own, from :func:`label_sets`) intersect.

    Applied like :func:`fc_mask_from_labels` (dense weight with zeros). The sets are per filter;
    the public implementation indexed the clusters by filter number, which is right only with
    one cluster per filter.

    Returns:
        Bool (C_out, C_in, kh, kw), the shape of ``nn.Conv2d.weight`` (``groups=1``).
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    pairs = fc_mask_from_labels(in_filter_labels, out_filter_labels)
    return pairs[:, :, None, None].expand(*pairs.shape, kh, kw).contiguous()


# ------------------------------------------------------------------- masked fine-tuning


def apply_mask(layer: nn.Module, mask: torch.Tensor) -> nn.Module:
    """Zero ``layer.weight`` where ``mask`` is False, in place (``nn.Linear`` or ``nn.Conv2d``)."""
    weight = layer.weight
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    with torch.no_grad():
        weight.masked_fill_(~mask.to(device=weight.device, dtype=torch.bool), 0.0)
    return layer


class MaskKeeper:
    """Re-applies masks to a model's layers, named by module path; pass it as ``after_step``.

    Weight decay and momentum move masked weights off zero during an optimiser step (their
    gradient is not zero); calling the keeper after every step puts them back to exactly 0, so
    the optimiser's buffers need no care. ``fit(..., after_step=keeper)``.

    Args:
        masks: ``{module path: bool mask of that module's weight}``.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        self.masks = {path: torch.as_tensor(m, dtype=torch.bool) for path, m in masks.items()}
        self._device_masks: dict[tuple[str, torch.device], torch.Tensor] = {}

    def __call__(self, model: nn.Module) -> nn.Module:
        for path, mask in self.masks.items():
            layer = get_module(model, path)
            key = (path, layer.weight.device)
            if key not in self._device_masks:
                self._device_masks[key] = mask.to(layer.weight.device)
            apply_mask(layer, self._device_masks[key])
        return model


def select_trainable(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Train only the parameters under the module paths ``prefixes`` (e.g. ``["head"]`` or
    ``["head", "features.conv5", "features.bn5"]``, the papers' two AFCC fine-tunings).

    BatchNorm running statistics of frozen layers still update in training mode.

    Returns:
        Names of the parameters left trainable.
    """
    modules = dict(model.named_modules())
    for p in prefixes:
        if p not in modules:
            raise unknown_name("module", p, [n for n in modules if n])
    kept = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(name.startswith(p + ".") for p in prefixes))
        if param.requires_grad:
            kept.append(name)
    return kept


# ------------------------------------------------------------------------ compact head


class SparseHead(nn.Module):
    """An output layer holding only the kept ``(filter, label)`` blocks of a linear head.

    Equal to ``nn.Linear(C*H*W, K)`` whose weight is zero outside the P kept blocks. The input
    is gathered per pair, multiplied by the pair's H*W weights and scatter-added into its label;
    every op (Gather, Mul, ReduceSum, ScatterElements) exports to ONNX opset 17.

    Args:
        filters: (P,) filter index of each kept pair.
        labels: (P,) output label of each kept pair.
        n_filters: C.
        out_features: K.
        spatial: (H, W) of each filter's block.
        bias: give the layer a bias of K values.

    Attributes:
        values: (P, H*W) weights of the kept blocks.
        param_group: "fc": training puts its parameters with the linear layers'.
    """

    param_group = "fc"

    def __init__(self, filters: torch.Tensor | Sequence[int], labels: torch.Tensor | Sequence[int], n_filters: int,
                 out_features: int, spatial: tuple[int, int], bias: bool = False):
        super().__init__()
        filters = torch.as_tensor(filters, dtype=torch.long).flatten()
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if filters.shape != labels.shape:
            raise ValueError(f"{filters.numel()} filters but {labels.numel()} labels")
        if filters.numel() and (int(filters.min()) < 0 or int(filters.max()) >= n_filters
                                or int(labels.min()) < 0 or int(labels.max()) >= out_features):
            raise ValueError("filter or label index out of range")
        self.n_filters, self.out_features = int(n_filters), int(out_features)
        self.spatial = (int(spatial[0]), int(spatial[1]))
        self.block = self.spatial[0] * self.spatial[1]
        self.in_features = self.n_filters * self.block
        self.register_buffer("filters", filters)
        self.register_buffer("labels", labels)
        self.values = nn.Parameter(torch.zeros(filters.numel(), self.block))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor, spatial: tuple[int, int]) -> "SparseHead":
        """The compact form of ``linear`` with ``mask`` applied (a pair is kept when any entry of
        its block is; entries of a kept block outside the mask are stored as 0)."""
        k, n_in = linear.weight.shape
        hw = int(spatial[0]) * int(spatial[1])
        if n_in % hw or tuple(mask.shape) != (k, n_in):
            raise ValueError(f"mask {tuple(mask.shape)} and spatial {tuple(spatial)} do not fit a "
                             f"({k}, {n_in}) weight")
        mask = mask.to(device=linear.weight.device, dtype=torch.bool)
        blocks = (linear.weight.detach() * mask).view(k, n_in // hw, hw)
        labels, filters = mask.view(k, n_in // hw, hw).any(-1).nonzero(as_tuple=True)  # sorted by label
        head = cls(filters.cpu(), labels.cpu(), n_in // hw, k, spatial, bias=linear.bias is not None)
        head.to(linear.weight.device)
        with torch.no_grad():
            head.values.copy_(blocks[labels, filters])
            if linear.bias is not None:
                head.bias.copy_(linear.bias)
        return head

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (zeros outside the kept blocks)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.to(self.values.device)
        with torch.no_grad():
            weight = torch.zeros(self.out_features, self.n_filters, self.block, device=self.values.device)
            weight[self.labels, self.filters] = self.values
            linear.weight.copy_(weight.view(self.out_features, self.in_features))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.n_filters, self.block)
        z = (x.index_select(1, self.filters) * self.values).sum(-1)  # (B, P)
        index = self.labels.unsqueeze(0).expand(x.shape[0], -1)
        out = torch.zeros(x.shape[0], self.out_features, dtype=z.dtype, device=z.device).scatter_add(1, index, z)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, spatial={self.spatial}, "
                f"pairs={self.filters.numel()}, bias={self.bias is not None}")


def compress_head(model: nn.Module, head_path: str, mask: torch.Tensor, spatial: tuple[int, int]) -> nn.Module:
    """Replace the ``nn.Linear`` at ``head_path`` with its :class:`SparseHead` and record the
    ``afcc`` transform, so :func:`~compress.compression.serialize.load_model` rebuilds it.

    Args:
        model: the network, changed in place.
        head_path: module path of the head, e.g. ``"head.out"``.
        mask: (K, C*H*W) bool, usually :func:`afcc_mask`.
        spatial: (H, W) of the tap feeding the head.

    Returns:
        ``model``.
    """
    linear = get_module(model, head_path)
    if not isinstance(linear, nn.Linear):
        raise UserError(f"{head_path!r} is a {type(linear).__name__}, not an nn.Linear; AFCC compresses a linear head")
    head = SparseHead.from_linear(linear, mask, spatial)
    set_module(model, head_path, head)
    record_transform(model, {"kind": "afcc", "module": head_path, "filters": head.filters.tolist(),
                             "labels": head.labels.tolist(), "spatial": list(head.spatial),
                             "in_features": head.in_features, "out_features": head.out_features,
                             "bias": head.bias is not None})
    return model


@register_transform("afcc")
def _replay_afcc(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Swap the linear layer at ``spec["module"]`` for an empty SparseHead with the recorded pairs
    (the weights are loaded afterwards)."""
    path = spec["module"]
    linear = get_module(model, path)
    n_in, k = int(spec["in_features"]), int(spec["out_features"])
    if not isinstance(linear, nn.Linear) or (linear.in_features, linear.out_features) != (n_in, k):
        raise UserError(f"afcc transform expects an nn.Linear({n_in}, {k}) at {path!r}, found {linear}")
    h, w = spec["spatial"]
    head = SparseHead(spec["filters"], spec["labels"], n_in // (h * w), k, (h, w), bias=bool(spec.get("bias", False)))
    set_module(model, path, head.to(linear.weight.device))
    return model


# ---------------------------------------------------------------------------- report


def afcc_report(mask: torch.Tensor, tap: TapAnalysis) -> dict[str, Any]:
    """How much AFCC removes from the head fed by ``tap``, and what the compact head stores.

    Returns:
        ``dense_weights``, ``kept_weights``, ``removed_fraction``, ``papers_estimate``,
        ``pairs`` (kept filter-label blocks), ``bytes_dense`` (float32 matrix) and
        ``bytes_sparse`` (float32 blocks plus two int64 indices per pair, as
        :class:`SparseHead` stores them).
    """
    mask = torch.as_tensor(mask, dtype=torch.bool)
    k, n_in = mask.shape
    hw = tap.spatial[0] * tap.spatial[1]
    pairs = int(mask.view(k, n_in // hw, hw).any(-1).sum())
    kept = count_kept(mask)
    return {
        "dense_weights": k * n_in,
        "kept_weights": kept,
        "removed_fraction": 1.0 - kept / max(1, k * n_in),
        "papers_estimate": papers_estimate(tap),
        "pairs": pairs,
        "bytes_dense": 4 * k * n_in,
        "bytes_sparse": pairs * (4 * hw + 2 * 8),
    }
