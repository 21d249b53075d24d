"""Shared fixtures: tiny random models, no network."""

import pytest
import torch

from recyclegpt.config import PRESETS
from recyclegpt.recycle import RecycleGPT


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tiny models gain nothing from a second thread, and two threads on a busy 2-core machine stall on
# each other; tests that load a real model set their own thread count.
torch.set_num_threads(1)


@pytest.fixture
def tiny() -> RecycleGPT:
    """A tiny random RecycleGPT (2-layer backbone, 1-layer module), in eval mode."""
    preset = PRESETS["tiny"]
    return RecycleGPT.from_config(preset.model, preset.recycle).eval()


@pytest.fixture
def shared_tiny() -> RecycleGPT:
    """A tiny random RecycleGPT whose backbone runs 4 logical layers over 2 shared blocks, in eval mode."""
    preset = PRESETS["tiny"]
    return RecycleGPT.from_config(preset.model.replace(n_layers=4, n_unique_layers=2), preset.recycle).eval()
