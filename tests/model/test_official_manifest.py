"""Every official name: exact parameter count, and the official-layout export has exactly the official keys/shapes."""

from __future__ import annotations

import json

import pytest
import torch

import imglish
from imglish.model.convert import to_official
from tests.conftest import PARITY_DIR, parity_file


def _manifest() -> dict:
    return json.loads(parity_file("official-models.json").read_text())["models"]


def _names() -> list:
    """The official names to parametrize over, read at collection from the manifest in tests/fixtures."""
    return sorted(json.loads((PARITY_DIR / "official-models.json").read_text())["models"])


def test_every_official_name_is_registered():
    names = set(_manifest())
    assert names <= set(imglish.list_models()), sorted(names - set(imglish.list_models()))
    official = {n for n in imglish.list_models() if imglish.get_model_info(n).official}
    assert official == names


@pytest.mark.parametrize("name", _names())
def test_parameter_count_and_official_keys(name):
    expected = _manifest()[name]
    with torch.device("meta"):
        model = imglish.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected["num_parameters"]
    exported = {k: list(v.shape) for k, v in to_official(model).items()}
    assert exported == expected["state_dict"]
