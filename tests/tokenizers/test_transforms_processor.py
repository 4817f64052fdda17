"""Per-task transforms (spec §5) and the Processor that saves them with a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imglish.tokenizers.processor import Processor
from imglish.tokenizers.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OfficialRandAugment,
    TransformConfig,
    build_transform,
)


def _img(w: int = 40, h: int = 20) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0)  # left half red, right half black
    return Image.fromarray(arr)


@pytest.mark.parametrize("task", ["vqav2", "nlvr2", "retrieval", "captioning"])
def test_vl_eval_squashes_and_normalises_with_half(task):
    x = build_transform(task, 16, train=False)(_img())
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    # Squash (no crop): the left half of the output is red, the right half black, over the full height.
    assert torch.allclose(x[0, :, :6], torch.ones(16, 6), atol=1e-2)  # (1 - 0.5) / 0.5
    assert torch.allclose(x[0, :, -6:], -torch.ones(16, 6), atol=1e-2)
    assert torch.allclose(x[1], -torch.ones(16, 16), atol=1e-2)


def test_imagenet_eval_center_crops_with_imagenet_stats():
    x = build_transform("imagenet", 20, train=False)(_img(40, 20))
    assert x.shape == (3, 20, 20)
    # Resize short side to 20 (already), then a center crop of 20 keeps columns 10..29: half red, half black.
    red = (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert x[0, :, :8].allclose(torch.full((20, 8), red), atol=1e-2)
    assert x[0, :, -8:].allclose(torch.full((20, 8), -IMAGENET_MEAN[0] / IMAGENET_STD[0]), atol=1e-2)


def test_training_transforms_are_random_and_follow_the_recipe():
    cfg = TransformConfig.for_task("vqav2", 32)
    assert cfg.uses_randaug and cfg.train_scale == (0.5, 1.0)
    assert not TransformConfig.for_task("nlvr2", 32).uses_randaug
    assert not TransformConfig.for_task("retrieval", 32).uses_randaug
    inet = TransformConfig.for_task("imagenet", 32)
    assert inet.mean == IMAGENET_MEAN and inet.train_scale == (0.08, 1.0) and inet.random_erasing == 0.25
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    for task in ("vqav2", "nlvr2", "imagenet"):
        tf = build_transform(task, 32, train=True)
        a, b = tf(img), tf(img)
        assert a.shape == b.shape == (3, 32, 32)
        assert not torch.equal(a, b)


def test_pretraining_gives_two_aligned_views():
    torch.manual_seed(0)
    tf = build_transform("pretraining", 32, train=True, tokenizer_image_size=16, color_jitter=0)
    img = _img(64, 64)
    view, tok = tf(img)
    assert view.shape == (3, 32, 32) and tok.shape == (3, 16, 16)
    assert tok.min() >= 0 and tok.max() <= 1
    # Same crop: downsampling the un-normalised model view gives the tokenizer view.
    un = view * 0.5 + 0.5
    down = torch.nn.functional.interpolate(un[None], size=16, mode="area")[0]
    assert (down - tok).abs().mean() < 0.05
    assert isinstance(build_transform("pretraining", 32, train=False)(img), torch.Tensor)


def test_official_randaugment_ops_change_the_image():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    ra = OfficialRandAugment()
    base = np.asarray(img)
    for op in ra.OPS:
        out = np.asarray(ra._apply_op(img, op))
        assert out.shape == base.shape
        assert np.array_equal(out, base) == (op == "identity"), op


def test_transform_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="unknown task"):
        TransformConfig.for_task("segmentation", 32)
    with pytest.raises(ValueError, match="image_size"):
        TransformConfig(task="vqav2", image_size=0)
    cfg = TransformConfig.for_task("imagenet", 224, crop_pct=0.875, randaug=None)
    assert TransformConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown TransformConfig keys"):
        TransformConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_processor_builds_batches_and_saves_next_to_a_checkpoint(tokenizer, tmp_path):
    proc = Processor(tokenizer, TransformConfig.for_task("vqav2", 16), max_length=12)
    path = tmp_path / "a.png"
    _img().save(path)
    batch = proc(images=[path, _img()], text=["a red circle", "two green triangles"])
    assert batch["image"].shape == (2, 3, 16, 16)
    assert torch.equal(batch["image"][0], batch["image"][1])
    assert batch["input_ids"].shape == batch["padding_mask"].shape == (2, 12)
    assert batch["input_ids"][0].tolist() == tokenizer("a red circle", max_length=12)["input_ids"][0].tolist()

    ckpt = tmp_path / "run" / "model.safetensors"
    ckpt.parent.mkdir()
    proc.save_next_to(ckpt)
    again = Processor.find_for(ckpt)
    assert again is not None and again.max_length == 12 and again.transform_config == proc.transform_config
    again_batch = again(images=[path], text=["a red circle"])
    assert torch.equal(again_batch["image"][0], batch["image"][0])
    assert torch.equal(again_batch["input_ids"][0], batch["input_ids"][0])
    assert Processor.find_for(tmp_path / "elsewhere" / "m.safetensors") is None

    vision_only = Processor(None, TransformConfig.for_task("imagenet", 16))
    with pytest.raises(ValueError, match="no text tokenizer"):
        vision_only(text="hi")
    with pytest.raises(ValueError, match="images, text, or both"):
        proc()
