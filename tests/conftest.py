"""Shared fixtures: the authors' OPT-1.3B pilot set (read from ../shared/data) and synthetic pools."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mapjax import RewardPool

PILOT_NAME = "opt1.3b-anthropic-harmless.json"
# The paper's value order (MAP.md section 7); the pilot file stores them in another order.
PAPER_VALUES = ("humor", "gpt2-helpful", "gpt2-harmless", "diversity", "coherence", "perplexity")


def pilot_path() -> Path:
    override = os.environ.get("MAPJAX_PILOT")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "data" / PILOT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"the authors' pilot set is expected at {path} (set MAPJAX_PILOT to move it)")
    return path


@pytest.fixture(scope="session")
def pilot_file() -> Path:
    return pilot_path()


@pytest.fixture(scope="session")
def pilot() -> RewardPool:
    return RewardPool.load(pilot_path())


def make_ragged_pool(seed: int = 0, prompts: int = 60, max_samples: int = 4, values: int = 3) -> RewardPool:
    """Correlated rewards, 1..max_samples samples per prompt, with per-prompt offsets."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(values, values)) / np.sqrt(values) + np.eye(values)
    offsets = rng.normal(scale=0.7, size=(prompts, 1, values))
    rewards = rng.normal(size=(prompts, max_samples, values)) @ mixing + offsets
    counts = rng.integers(1, max_samples + 1, size=prompts)
    mask = np.arange(max_samples)[None, :] < counts[:, None]
    return RewardPool(rewards, mask, tuple(f"v{i}" for i in range(values)))


@pytest.fixture
def ragged_pool() -> RewardPool:
    return make_ragged_pool()


# The PyTorch counterparts live with the benchmarks; tests import them as oracles.
import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
