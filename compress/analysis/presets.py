"""The probe settings the papers give, by name (``--probe-preset NAME``, ``analysis.probe_preset``).

Each preset sets the probe's optimiser values its source states, read from the papers' text
(``../shared/papers/``): learning rate (eta), Nesterov momentum (mu), L2 weight decay (alpha),
the decay schedule (q every dt epochs) and the mini-batch of 100 inputs that both papers' Methods
give for all their training. Neither paper states how many epochs the probes trained, so no
preset sets ``probe_epochs`` except ``public-code``, whose value is the public implementation's.
A probe value set explicitly (a flag, or a key of the recipe's ``analysis``) overrides the
preset's; what a preset does not set keeps its default (the public code's).

A leaf: it imports nothing from the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ProbePreset", "PROBE_PRESETS", "PresetName", "PUBLIC_CODE"]

PresetName = Literal["public-code", "tzach-vgg16", "tzach-vgg6", "tzach-avgg16", "meir-cifar100", "meir-cifar-k",
                     "meir-efficientnet"]

_TZACH = "Tzach et al., The mechanism underlying successful deep learning (arXiv 2305.18078)"
_MEIR = "Meir, Tzach et al., Universality of underlying mechanism for successful deep learning"


@dataclass(frozen=True)
class ProbePreset:
    """One published probe setting.

    Attributes:
        name: the preset's name.
        setting: the architecture and data the source used it for.
        values: the ``AnalysisConfig`` probe fields it sets (``probe_lr``, ...).
        source: where the values are written, paper and section.
        note: what else the source did that the preset does not set.
    """

    name: str
    setting: str
    values: dict[str, Any]
    source: str
    note: str = ""


def _sgd(lr: float, momentum: float, weight_decay: float, decay: float, step: int) -> dict[str, Any]:
    return {"probe_batch_size": 100, "probe_lr": lr, "probe_momentum": momentum, "probe_weight_decay": weight_decay,
            "probe_lr_decay": decay, "probe_lr_step": step}


PUBLIC_CODE: dict[str, Any] = {"probe_epochs": 200, **_sgd(0.01, 0.975, 1e-3, 0.975, 1)}

PROBE_PRESETS: dict[str, ProbePreset] = {p.name: p for p in [
    ProbePreset(
        "public-code", "the default: any model", PUBLIC_CODE,
        "the public implementation by the same group (code for 'Advanced deep architecture pruning using single "
        "filter performance', arXiv 2501.12880): 200 epochs, batch 100, lr 0.01, momentum 0.975, weight decay "
        "1e-3, lr x0.975 per epoch"),
    ProbePreset(
        "tzach-vgg16", "VGG-16 on CIFAR-10", _sgd(0.1, 0.975, 1e-5, 0.6, 20),
        f"{_TZACH}, Supplementary: 'Architectures and Training the fully connected layer' and Fig. 1 (VGG-16 "
        "hyper-parameters): eta 0.1, mu 0.975, alpha 1e-5, q 0.6 every 20 epochs; mini-batch 100 ('Hyper-parameters')"),
    ProbePreset(
        "tzach-vgg6", "VGG-6 on CIFAR-10", _sgd(0.1, 0.975, 1e-5, 0.6, 20),
        f"{_TZACH}, Supplementary, Fig. 7 (VGG-6 hyper-parameters): the same values as VGG-16"),
    ProbePreset(
        "tzach-avgg16", "AVGG-16 on CIFAR-10", _sgd(0.02, 0.995, 1e-8, 0.6, 20),
        f"{_TZACH}, Supplementary: 'Architectures and Training the fully connected layer' and Fig. 8 (AVGG-16 "
        "hyper-parameters): eta 0.02, mu 0.995, alpha 1e-8, q 0.6 every 20 epochs",
        "the paper probes AVGG-16 at layer 13 only"),
    ProbePreset(
        "meir-cifar100", "VGG-16 on CIFAR-100 and its CIFAR-K/100 subsets (K = 20, 40, 60, 100)",
        _sgd(0.005, 0.975, 1.5e-5, 0.65, 20),
        f"{_MEIR}, Supplementary, VGG-16 hyper-parameters, 'For the training of the FC layer' (CIFAR-K/100): "
        "eta 0.005, mu 0.975, alpha 1.5e-5, q 0.65 every 20 epochs"),
    ProbePreset(
        "meir-cifar-k", "VGG-16 on the CIFAR-K/10 subsets of CIFAR-10 (K = 3, 6, 8, 10)",
        _sgd(0.02, 0.995, 1e-7, 0.6, 20),
        f"{_MEIR}, Supplementary, VGG-16 hyper-parameters on CIFAR-K/10, 'For the training of the FC layer': "
        "eta 0.02, mu 0.995, alpha 1e-7, q 0.6 every 20 epochs"),
    ProbePreset(
        "meir-efficientnet", "EfficientNet-B0 (transfer-learned) on CIFAR-K/100, CIFAR-100 and ImageNet",
        _sgd(0.005, 0.975, 1.5e-5, 0.975, 1),
        f"{_MEIR}, Supplementary, EfficientNet-B0 hyper-parameters: eta 0.005, mu 0.975, alpha 1.5e-5, q 0.975 "
        "every epoch",
        "the paper also average-pools every tap 7x7 before its probe (at 224x224): add --tap-pool 7 "
        "(analysis.tap_pool: 7); the preset does not, as it depends on the input size"),
]}
