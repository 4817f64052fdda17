"""Shared test helpers: where the parity fixtures live, and tiny model builders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: outputs of the official code, kept in the repository so that a fresh clone runs every parity test
#: (tests/fixtures/README.md says what they are and how they were made)
PARITY_DIR = REPO / "tests" / "fixtures"


def parity_file(name: str) -> Path:
    path = PARITY_DIR / name
    if not path.is_file():
        pytest.fail(f"parity fixture {path} is missing from this checkout (tests/fixtures/README.md)")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
