"""Models: the papers' VGGs, the factory for own/timm/torchvision models, checkpoints and taps."""

from compress.models import vgg  # noqa: F401  (registers the architectures)
from compress.models.factory import available_models, create_model, load_checkpoint, read_state_dict
from compress.models.registry import list_models, register_model
from compress.models.taps import capture, default_taps, resolve_taps, run_to_taps, tap_shapes

__all__ = ["available_models", "create_model", "load_checkpoint", "read_state_dict", "list_models",
           "register_model", "capture", "default_taps", "resolve_taps", "run_to_taps", "tap_shapes"]
