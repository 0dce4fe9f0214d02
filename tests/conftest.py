"""Test set-up: offline hub, deterministic seeds, tiny models importable as ``tiny``."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add contention


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
