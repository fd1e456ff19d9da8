"""Shared fixtures: tiny models and data so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress.data import load_data

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


@pytest.fixture(scope="session")
def digits():
    return load_data("digits")


@pytest.fixture(scope="session")
def small_digits():
    return load_data("digits", limit_train=400, limit_test=200)


def tiny_vgg(**kw):
    from compress.models import create_model

    opts = dict(width=0.125, fc_hidden=[], num_classes=10)
    opts.update(kw)
    return create_model("vgg6", **opts)
