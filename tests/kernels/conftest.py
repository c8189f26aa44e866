"""Fixtures for the kernel tests: fresh random inputs every run."""

from __future__ import annotations

import time

import numpy as np
import pytest


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A new seed every run (printed, so a failure can be replayed)."""
    seed = time.time_ns() % (2**32)
    print(f"{request.node.name}: seed={seed}")
    return np.random.default_rng(seed)
