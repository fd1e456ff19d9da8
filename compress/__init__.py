"""compress: find which parts of a trained image classifier do real work, and remove the rest.

The public API, by phase (the heavier parts load on first use)::

    compress.create_model, compress.ModelConfig          # models: own VGGs, timm:, torchvision:
    compress.load_data, compress.DataConfig, compress.register_dataset
    compress.TrainConfig                                 # training
    compress.AnalysisConfig, compress.analyze_model, compress.find_clusters, compress.count_noise
    compress.save_model, compress.load_model             # model files that replay every structural change
    compress.load_recipe, compress.run_recipe, compress.Step, compress.register_step
"""

from __future__ import annotations

import importlib
from typing import Any

from compress._version import __version__
from compress.analysis import AnalysisConfig, analyze_model, count_noise, find_clusters, load_analysis
from compress.data import DataConfig, load_data, register_dataset
from compress.models import ModelConfig, create_model, resolve_taps
from compress.training import TrainConfig

_LAZY = {"save_model": "compress.compression.serialize", "load_model": "compress.compression.serialize",
         "load_recipe": "compress.recipe", "Step": "compress.recipe", "register_step": "compress.recipe",
         "run_recipe": "compress.recipe.runner"}

__all__ = ["__version__", "AnalysisConfig", "analyze_model", "count_noise", "find_clusters", "load_analysis",
           "DataConfig", "load_data", "register_dataset", "ModelConfig", "create_model", "resolve_taps", "TrainConfig",
           *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
