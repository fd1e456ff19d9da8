"""Models: the papers' VGGs, the one factory for own/timm/torchvision models, checkpoints, taps,
and the leaves every other part uses (counting, input size, module paths, the transform registry)."""

from compress.models import vgg  # noqa: F401  (registers the architectures)
from compress.models.factory import ModelConfig, available_models, create_model, load_checkpoint, read_state_dict
from compress.models.introspect import (count_flops, count_nonzero, count_params, get_module, input_size_of,
                                        match_modules, set_module)
from compress.models.registry import list_models, register_model
from compress.models.taps import capture, default_taps, resolve_taps, run_to_taps, tap_shapes
from compress.models.transforms import apply_transform, record_transform, register_transform

__all__ = ["ModelConfig", "available_models", "create_model", "load_checkpoint", "read_state_dict", "count_flops",
           "count_nonzero", "count_params", "get_module", "input_size_of", "match_modules", "set_module",
           "list_models", "register_model", "capture", "default_taps", "resolve_taps", "run_to_taps", "tap_shapes",
           "apply_transform", "record_transform", "register_transform"]
