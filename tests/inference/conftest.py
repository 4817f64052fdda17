"""Fixtures of the inference tests: tiny checkpoints of every task in the layout ``imglish finetune`` writes
(``model.safetensors``, ``processor.json``, ``sentencepiece.model``, ``task.json``), a text tokenizer, and images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imglish.tokenizers.text import TextTokenizer, train_sentencepiece

WORDS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "cube", "ball", "left", "right", "above",
         "below", "what", "colour", "is", "the", "a", "photo", "of", "how", "many", "there", "are", "two", "three",
         "an", "image", "showing", "close-up", "picture", "small", "large", "dog", "cat", "fish"]
#: task -> (registry name, task.json state)
CHECKPOINTS = {
    "classify": ("beit3_tiny_patch16_224_imageclassification", {"classes": ["cat", "dog", "fish"]}),
    "vqa": ("beit3_tiny_patch16_224_vqav2", {"answers": ["red", "green", "blue", "two", "yes", "no"]}),
    "caption": ("beit3_tiny_patch16_224_captioning", {}),
    "nlvr2": ("beit3_tiny_patch16_224_nlvr2", {}),
    "retrieval": ("beit3_tiny_patch16_224_retrieval", {}),
}
FINETUNE_TASK = {"classify": "imagenet", "vqa": "vqav2", "caption": "coco_captioning", "nlvr2": "nlvr2",
                 "retrieval": "coco_retrieval"}
TRANSFORM = {"classify": "imagenet", "vqa": "vqav2", "caption": "captioning", "nlvr2": "nlvr2",
             "retrieval": "retrieval"}
IMG = 32


@pytest.fixture(scope="session")
def infer_tokenizer(tmp_path_factory) -> TextTokenizer:
    folder = tmp_path_factory.mktemp("infer_spm")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=8)) for _ in range(400)]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    return TextTokenizer(train_sentencepiece([corpus], vocab_size=60, output=folder / "spm.model",
                                             model_type="bpe", seed=0))


def make_checkpoint(root: Path, kind: str, tokenizer: TextTokenizer, seed: int = 0) -> Path:
    """A tiny random-weight checkpoint of ``kind`` at 32 pixels, saved as ``imglish finetune`` saves one."""
    import imglish
    from imglish.tokenizers.processor import Processor
    from imglish.tokenizers.transforms import TransformConfig

    name, state = CHECKPOINTS[kind]
    kwargs = {}
    if "classes" in state:
        kwargs["num_classes"] = len(state["classes"])
    if "answers" in state:
        kwargs["num_classes"] = len(state["answers"])
    torch.manual_seed(seed)
    model = imglish.create_model(name, img_size=IMG, vocab_size=len(tokenizer), depth=2, **kwargs)
    with torch.no_grad():  # give the heads some spread so that the argmax is not a tie
        for p in model.parameters():
            if p.ndim == 2 and p.shape[0] < 10:
                p.normal_(0, 0.5)
    out = root / kind
    proc = Processor(tokenizer, TransformConfig.for_task(TRANSFORM[kind], IMG), max_length=32)
    path = imglish.save_model(model.eval(), out / "model.safetensors", processor=proc)
    (out / "task.json").write_text(json.dumps({"task": FINETUNE_TASK[kind], "state": state}))
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, infer_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("infer_ckpt")
    return {kind: make_checkpoint(root, kind, infer_tokenizer) for kind in CHECKPOINTS}


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("infer_images")
    return [write_image(folder / f"img{i}.png", i) for i in range(4)]


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory, images) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("infer_bad")
    src = images[0].read_bytes()
    jpeg = folder / "good.jpg"
    Image.open(images[0]).convert("RGB").save(jpeg, quality=90)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    text = folder / "notes.txt"
    text.write_text("this is not an image\n")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    assert src
    return {"truncated": truncated, "text": text, "empty": empty, "missing": folder / "missing.png"}
