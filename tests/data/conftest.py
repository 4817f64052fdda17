"""Shared fixtures: one small synthetic world per test session."""

from __future__ import annotations

import pytest

from imglish.data.synthetic import WorldConfig, generate_world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A 60-image world (48 train / 6 val / 6 test), all formats, written once."""
    root = tmp_path_factory.mktemp("world") / "w"
    generate_world(WorldConfig(num_images=60, seed=3, shard_size=16, workers=1), root)
    return root
