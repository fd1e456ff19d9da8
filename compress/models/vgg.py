"""The papers' CIFAR architectures: VGG-16, VGG-6 and AVGG-16, with declared feature taps.

Every conv layer is named ``features.conv<i>`` (1-based, as the papers count layers), followed
by ``features.bn<i>`` (optional) and ``features.relu<i>``; a pooling after conv ``i`` is
``features.pool<i>``. The papers probe right after each pooling, so the default taps are the
pooling modules, declared in ``model.feature_info`` as timm does.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn

from compress.checks import integer, number
from compress.errors import OptionError, UserError, shorten
from compress.models.registry import register_model

MAX_WIDTH = 16.0  # width multiplier
MAX_FC = 65_536  # units of one hidden FC layer
MAX_FC_LAYERS = 16

# (out_channels, pooling after this conv: None | ("max", k) | ("avg", k))
_VGG16 = [(64, None), (64, ("max", 2)), (128, None), (128, ("max", 2)), (256, None), (256, None),
          (256, ("max", 2)), (512, None), (512, None), (512, ("max", 2)), (512, None), (512, None),
          (512, ("max", 2))]
_VGG6 = [(64, ("max", 2)), (128, ("max", 2)), (256, ("max", 2)), (512, ("max", 2)), (512, ("max", 2))]
_AVGG16 = [(c, None) for c, _ in _VGG16]
_AVGG16[6] = (256, ("avg", 4))
_AVGG16[12] = (512, ("max", 2))


class VGG(nn.Module):
    """A plain VGG: 3x3 conv layers with ReLU, poolings where the config says, an FC head.

    Args:
        cfg: one ``(out_channels, pooling)`` entry per conv layer.
        num_classes: output units K.
        in_chans: input image channels.
        img_size: input height and width (the head's input size depends on it).
        width: multiplier applied to every conv and hidden FC width.
        batch_norm: insert BatchNorm2d after every conv.
        fc_hidden: widths of the hidden FC layers before the output layer (before ``width``);
            ``()`` gives a single output layer.
    """

    def __init__(self, cfg: Sequence[tuple[int, tuple[str, int] | None]], *, num_classes: int = 10,
                 in_chans: int = 3, img_size: int = 32, width: float = 1.0, batch_norm: bool = True,
                 fc_hidden: Sequence[int] = ()):
        super().__init__()
        if width <= 0:
            raise UserError(f"width must be > 0, got {width}; 1.0 is the papers' width, 0.25 is CPU scale")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        self.feature_info: list[dict] = []
        c_in, size, reduction = in_chans, img_size, 1
        for i, (c, pool) in enumerate(cfg, start=1):
            c_out = max(1, int(round(c * width)))
            layers[f"conv{i}"] = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)
            if batch_norm:
                layers[f"bn{i}"] = nn.BatchNorm2d(c_out)
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            if pool is not None:
                kind, k = pool
                layers[f"pool{i}"] = nn.MaxPool2d(k) if kind == "max" else nn.AvgPool2d(k)
                size //= k
                reduction *= k
                self.feature_info.append(
                    {"module": f"features.pool{i}", "num_chs": c_out, "reduction": reduction, "layer": i}
                )
            c_in = c_out
        if size < 1:
            smallest = math.prod(pool[1] for _, pool in cfg if pool)
            raise UserError(f"img_size {img_size} is too small for this VGG's {len(self.feature_info)} poolings; "
                            f"inputs need at least {smallest}x{smallest} pixels (resize with --image-size {smallest})")
        self.features = nn.Sequential(layers)
        self.num_features = c_in * size * size
        head: OrderedDict[str, nn.Module] = OrderedDict()
        n_in = self.num_features
        for j, h in enumerate(fc_hidden, start=1):
            h = max(1, int(round(h * width)))
            head[f"fc{j}"] = nn.Linear(n_in, h)
            head[f"relu{j}"] = nn.ReLU(inplace=True)
            n_in = h
        head["out"] = nn.Linear(n_in, num_classes, bias=False)  # bias-free, as in the papers
        self.head = nn.Sequential(head)
        self.num_classes = num_classes
        self.default_cfg = {"input_size": (in_chans, img_size, img_size)}
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.head.out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _head(fc_hidden: Sequence[int] | None, default: Sequence[int]) -> Sequence[int]:
    return tuple(default if fc_hidden is None else fc_hidden)


@register_model
def vgg16(*, fc_hidden: Sequence[int] | None = None, **kwargs) -> VGG:
    """VGG-16: 13 conv layers, max-pooling after conv 2, 4, 7, 10, 13; head 512 -> 4096 -> 4096 -> K."""
    return VGG(_VGG16, fc_hidden=_head(fc_hidden, (4096, 4096)), **kwargs)


@register_model
def vgg6(*, fc_hidden: Sequence[int] | None = None, **kwargs) -> VGG:
    """VGG-6: 5 conv layers each followed by 2x2 max-pooling; one FC layer to the K outputs."""
    return VGG(_VGG6, fc_hidden=_head(fc_hidden, ()), **kwargs)


@register_model
def avgg16(*, fc_hidden: Sequence[int] | None = None, **kwargs) -> VGG:
    """AVGG-16: VGG-16 convs with 4x4 average pooling after conv 7 and 2x2 max-pooling after conv 13.

    At 32x32 input the head sees 512 x 4 x 4 = 8,192 inputs.
    """
    return VGG(_AVGG16, fc_hidden=_head(fc_hidden, (4096, 4096)), **kwargs)


def check_options(options: dict) -> None:
    """Refuse bad options of the own VGGs before anything is built (``width``, ``batch_norm``,
    ``fc_hidden``), each named ``options.<key>``.

    Raises:
        OptionError: an unknown option, a non-finite or out-of-range width, a bad hidden width.
    """
    valid = ("width", "batch_norm", "fc_hidden")
    for key in options:
        if key not in valid:
            raise OptionError("options", f"{shorten(key)}: not an option of the own VGGs; valid: {', '.join(valid)}")
    if "width" in options:
        number("options.width", options["width"], low=0, high=MAX_WIDTH, low_open=True,
               hint="the width multiplier: 1.0 is the papers' width, 0.25 CPU scale")
    if "batch_norm" in options and not isinstance(options["batch_norm"], bool):
        raise OptionError("options.batch_norm", f"{shorten(options['batch_norm'])}: expected true or false")
    hidden = options.get("fc_hidden")
    if hidden is not None:
        if not isinstance(hidden, (list, tuple)) or len(hidden) > MAX_FC_LAYERS:
            raise OptionError("options.fc_hidden", f"{shorten(hidden)}: expected a list of at most {MAX_FC_LAYERS} "
                                                   f"hidden widths, e.g. [4096, 4096], or [] for none")
        for h in hidden:
            integer("options.fc_hidden", h, low=1, high=MAX_FC, hint="every hidden FC width is a positive integer")


for _builder in (vgg16, vgg6, avgg16):
    _builder.check_options = check_options  # type: ignore[attr-defined]
