"""Phase 2: bias-free linear probes trained on cached tap features (scikit-learn style)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from compress.progress import tqdm

__all__ = ["LinearProbe"]


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

    def fit(self, features: torch.Tensor, labels: torch.Tensor, progress: bool = False, desc: str = "probe") -> "LinearProbe":
        """Train on ``features`` (N, ...) of any float dtype and ``labels`` (N,)."""
        device = self._device()
        gen = torch.Generator().manual_seed(self.seed)
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
        n = len(labels)
        self.history_ = []
        for _ in tqdm(range(self.epochs), desc=desc, disable=not progress, leave=False):
            order = torch.randperm(n, generator=gen)
            total = torch.zeros((), device=device)
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                xb = x_dev[idx.to(x_dev.device)] if resident else x_dev[idx.sort().values].to(device)
                yb = y_dev[idx.to(device)] if resident else y_dev[idx.sort().values.to(device)]
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
    def decision_function(self, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Output fields (N, K) for ``features``."""
        x = features.reshape(len(features), -1)
        out = [x[i:i + batch_size].float() @ self.coef_.t() for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.num_classes)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.decision_function(features).argmax(1)

    def score(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Accuracy on ``features``/``labels``."""
        return (self.predict(features) == labels).float().mean().item()
