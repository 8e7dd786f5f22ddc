"""Shared fixtures. Random inputs are fresh each run; the seed is printed so a failure replays."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process DeepSpeed sets RANK, WORLD_SIZE, MASTER_PORT, ... in os.environ; subprocesses
    started by later tests (Slurm jobs, launchers) would inherit them. Every test starts clean."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def seed() -> int:
    """Fresh each test; ``MIMAE_TEST_SEED=<printed seed> pytest <test id>`` replays a failure."""
    value = int(os.environ.get("MIMAE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"random seed: {value}")
    return value


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
