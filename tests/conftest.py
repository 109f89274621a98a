"""Test setup: one intra-op thread (the suite runs on a small shared machine) and fixed seeds."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

# Make the plain-math reference helpers (tests/_reference.py) importable under any import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
