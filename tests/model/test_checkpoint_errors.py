"""A file that is not a valid checkpoint is refused with a message that names it, says what is wrong and which
formats are accepted, and never passes on torch's advice to load with ``weights_only=False``."""

from __future__ import annotations

import collections

import pytest
import torch

from imglish.model.loading import read_checkpoint, safe_torch_load
from imglish.training.checkpoint import CheckpointManager


class _Opaque:  # a Python object a safe loader must refuse
    pass


def _bad_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 8)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Opaque()}, pickled)
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.zeros(4096)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 64)
    return {"garbage": garbage, "pickled": pickled, "truncated": truncated, "safetensors": bad_st}


@pytest.mark.parametrize("kind", ["garbage", "pickled", "truncated", "safetensors"])
def test_bad_checkpoints_get_a_clear_error(tmp_path, kind):
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(ValueError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "weights_only=False" not in msg and "set to `False`" not in msg and "trust" not in msg
    if kind == "pickled":
        assert "_Opaque" in msg and "does not unpickle" in msg
    elif kind == "safetensors":
        assert "not a valid safetensors file" in msg
    else:
        assert "not a valid checkpoint" in msg and ".safetensors" in msg


def test_training_checkpoints_use_the_same_safe_loader(tmp_path):
    path = _bad_files(tmp_path)["truncated"]
    with pytest.raises(ValueError, match="not a valid checkpoint"):
        CheckpointManager.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        safe_torch_load(tmp_path / "missing.pt")


def test_allowed_classes_pass_the_safe_loader(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save({"w": torch.ones(3), "meta": collections.OrderedDict(a=1)}, path)
    obj = safe_torch_load(path)
    assert torch.equal(obj["w"], torch.ones(3)) and obj["meta"]["a"] == 1
