"""Shared fixtures: tiny random models, no network."""

import pytest
import torch

from recyclegpt.config import PRESETS
from recyclegpt.recycle import RecycleGPT


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> RecycleGPT:
    """A tiny random RecycleGPT (2-layer backbone, 1-layer module), in eval mode."""
    preset = PRESETS["tiny"]
    return RecycleGPT.from_config(preset.model, preset.recycle).eval()
