"""Phase 2: bias-free linear probes trained on cached tap features (scikit-learn style)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from compress.progress import tqdm

__all__ = ["LinearProbe"]

RELEASE_BYTES = 256 * 2**20  # feature bytes read between two calls of a cache's release (its file pages dropped)
CHUNK_BYTES = 64 * 2**20  # float32 rows scored at once


def _every(rows: int, row_bytes: int, budget: int = RELEASE_BYTES) -> int:
    """How many batches of ``rows`` rows of ``row_bytes`` bytes make ``budget`` bytes (at least 1)."""
    return max(1, budget // max(1, rows * row_bytes))


class LinearProbe:
    """A bias-free ``Linear(C*H*W -> K)`` on frozen features, trained with SGD + Nesterov.

    Defaults follow the public implementation of the method: 200 epochs, batch 100, lr 0.01,
    momentum 0.975, weight decay 1e-3, learning rate x0.975 per epoch, uniform init in
    +-1/sqrt(fan_in). The papers' probes decay the learning rate in steps instead (x0.6 every 20
    epochs, ``lr_step=20``; see :mod:`compress.analysis.presets`).

    Args:
        num_classes: K.
        epochs: passes over the cached features.
        batch_size: samples per step.
        lr: initial learning rate.
        momentum: Nesterov momentum.
        weight_decay: L2 coefficient.
        lr_decay: learning rate factor applied every ``lr_step`` epochs.
        lr_step: epochs between two decays (1: after every epoch).
        seed: seed of the initialisation and the shuffling.
        device: where to train (default CUDA when present).

    Attributes:
        coef_: (K, C*H*W) trained weight, on the CPU.
        history_: training loss per epoch.
    """

    def __init__(self, num_classes: int, *, epochs: int = 200, batch_size: int = 100, lr: float = 0.01,
                 momentum: float = 0.975, weight_decay: float = 1e-3, lr_decay: float = 0.975, lr_step: int = 1,
                 seed: int = 0, device: torch.device | str | None = None):
        self.num_classes = num_classes
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.lr_decay = lr_decay
        self.lr_step = lr_step
        self.seed = seed
        self.device = device

    def _device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def fit(self, features: torch.Tensor, labels: torch.Tensor, progress: bool = False, desc: str = "probe",
            release: Callable[[], None] | None = None) -> "LinearProbe":
        """Train on ``features`` (N, ...) of any float dtype and ``labels`` (N,).

        ``release``, when the features are a memory-mapped cache, drops the file pages read so far
        from this process (:meth:`~compress.analysis.features.FeatureCache.release`); it is called
        every 256 MiB of rows read, so the resident set does not grow with the cache's size.

        ``features`` may hold V versions of every sample, version-major ((V*N, ...): row
        ``v * N + i`` is version v of sample i, as a :class:`~compress.analysis.features.FeatureCache`
        with augmented copies holds them): each epoch then takes, for every sample, one of its V
        versions at random (seeded per epoch by ``seed`` and the epoch) in the place of the sample;
        the order, the batches and the steps are those of N samples. With V = 1 no version is drawn
        and the training is exactly the one on (N, ...) features.
        """
        device = self._device()
        gen = torch.Generator().manual_seed(self.seed)
        n = len(labels)
        if n == 0 or len(features) % n:
            raise ValueError(f"{len(features)} rows of features for {n} labels: a probe needs samples, and a whole "
                             f"number of versions of each")
        versions = len(features) // n
        x_all = features.reshape(len(features), -1)
        d = x_all.shape[1]
        bound = 1.0 / math.sqrt(d)
        w = (torch.rand(self.num_classes, d, generator=gen) * 2 - 1).mul_(bound).to(device).requires_grad_(True)
        opt = torch.optim.SGD([w], lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=True)
        if self.lr_step == 1:  # x lr_decay after every epoch
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=self.lr_decay)
        else:  # x lr_decay every lr_step epochs (the papers' (q, dt) schedule)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.lr_step, gamma=self.lr_decay)
        # Small caches move to the device once; large ones stream batch by batch.
        resident = x_all.numel() * 4 < 2**30 or device.type == "cpu"
        x_dev = x_all.to(device) if resident else x_all
        y_dev = labels.to(device)
        self.history_ = []
        every = _every(self.batch_size, d * x_all.element_size())
        for epoch in tqdm(range(self.epochs), desc=desc, disable=not progress, leave=False):
            order = torch.randperm(n, generator=gen)
            if versions > 1:  # each sample's version this epoch, from its own generator (V = 1 draws nothing)
                pick = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + 1)
                order_rows = order + n * torch.randint(0, versions, (n,), generator=pick)[order]
            else:
                order_rows = order
            total = torch.zeros((), device=device)
            for step, start in enumerate(range(0, n, self.batch_size), start=1):
                if release is not None and step % every == 0:
                    release()
                idx = order[start:start + self.batch_size]
                rows = order_rows[start:start + self.batch_size]
                if resident:
                    xb, yb = x_dev[rows.to(x_dev.device)], y_dev[idx.to(device)]
                else:  # read the rows in file order
                    rows = rows.sort().values
                    xb, yb = x_dev[rows].to(device), y_dev[(rows % n).to(device)]
                loss = F.cross_entropy(xb.float() @ w.t(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * len(idx)
            sched.step()
            self.history_.append(float(total) / n)
        self.coef_ = w.detach().cpu()
        return self

    @torch.inference_mode()
    def decision_function(self, features: torch.Tensor, batch_size: int = 4096,
                          release: Callable[[], None] | None = None) -> torch.Tensor:
        """Output fields (N, K) for ``features``, ``batch_size`` rows at a time at most (fewer when
        their float32 copy would exceed 64 MiB); ``release`` as in :meth:`fit`."""
        x = features.reshape(len(features), -1)
        rows = max(1, min(batch_size, CHUNK_BYTES // max(1, 4 * x.shape[1])))
        every = _every(rows, x.shape[1] * x.element_size())
        out = []
        for step, i in enumerate(range(0, len(x), rows), start=1):
            out.append(x[i:i + rows].float() @ self.coef_.t())
            if release is not None and step % every == 0:
                release()
        return torch.cat(out) if out else torch.empty(0, self.num_classes)

    def predict(self, features: torch.Tensor, release: Callable[[], None] | None = None) -> torch.Tensor:
        return self.decision_function(features, release=release).argmax(1)

    def score(self, features: torch.Tensor, labels: torch.Tensor, release: Callable[[], None] | None = None) -> float:
        """Accuracy on ``features``/``labels``."""
        return (self.predict(features, release) == labels).float().mean().item()
