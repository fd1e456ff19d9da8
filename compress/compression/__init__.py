"""Compression driven by the analysis: depth trimming, block removal, filter dilution, AFCC,
pruning with importance criteria, and the model file that replays every structural change."""

from compress.compression import afcc, blocks, dilute, trim  # noqa: F401  (register their transforms)
from compress.compression.serialize import load_model, read_model_meta, save_model

__all__ = ["load_model", "read_model_meta", "save_model"]
