"""Shared test helpers: where the parity fixtures live, and tiny model builders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PARITY_DIR = REPO.parent / "shared" / "parity"


def parity_file(name: str) -> Path:
    path = PARITY_DIR / name
    if not path.is_file():
        pytest.skip(f"parity fixture {path} is not available (../shared is missing)")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
