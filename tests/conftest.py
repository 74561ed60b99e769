"""Shared test fixtures. Keep this file small: fixtures used by one test file live in that file."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest
import torch

# The suite never touches the network: tiny presets are built from config, and a hub id that is not
# cached must fail at once instead of retrying for half a minute. Set before anything imports
# huggingface_hub (it reads the variable at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Tiny models gain nothing from intra-op threads, and on a shared, busy CPU the OpenMP threads of each
# small matmul wait on one another: a 0.2 s act took 6-25 s with 2 threads under load, 0.2 s with one.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def make_observations() -> Callable[..., list[dict]]:
    """Synthetic ``{"image", "text"}`` observations, so tests need no environment module.

    ``make_observations(texts, size=64, seed=0)`` gives one random uint8 (size, size, 3) image per text.
    """

    def make(texts: list[str], size: int = 64, seed: int = 0) -> list[dict]:
        rng = np.random.default_rng(seed)
        return [{"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "text": text} for text in texts]

    return make


@pytest.fixture
def cli_fails(capsys) -> Callable[..., str]:
    """``cli_fails(argv, pattern)``: the ``vlmrl`` command must stop with exit status 2 and one line
    ``vlmrl: error: ...`` on stderr that matches ``pattern``; returns that line."""
    import re

    def run(argv: list[str], pattern: str) -> str:
        from experiments.cli import main

        with pytest.raises(SystemExit) as stopped:
            main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2, lines
        assert lines and lines[-1].startswith("vlmrl: error: ") and re.search(pattern, lines[-1]), lines
        return lines[-1]

    return run
