"""Shared fixtures of the task tests: one small world and one text tokenizer per session, and a tiny-run config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imglish.data.synthetic import WorldConfig, generate_world


@pytest.fixture(scope="session")
def task_world(tmp_path_factory) -> Path:
    """A 400-image world (320 train / 40 val / 40 test), written once (no webdataset shards)."""
    root = tmp_path_factory.mktemp("task_world") / "w"
    generate_world(
        WorldConfig(num_images=400, seed=5, workers=1, formats=("coco", "flickr30k", "vqav2", "nlvr2", "imagenet", "text")),
        root,
    )
    return root


@pytest.fixture(scope="session")
def task_tokenizer(task_world, tmp_path_factory) -> Path:
    """The text tokenizer a tiny run trains for itself on the world's captions and texts (BPE, 256 ids at most: the
    world's words stay whole), trained once by the runs' own code."""
    from imglish.training.config import build_config
    from imglish.training.pretrain import load_world_sources, prepare_text_tokenizer, tokenizer_corpus

    folder = tmp_path_factory.mktemp("task_tok")
    cfg = build_config("tiny", None, {"out": str(folder), "data.path": str(task_world)})
    prepare_text_tokenizer(cfg, lambda: tokenizer_corpus(load_world_sources(task_world, "train"), folder))
    return folder / "tokenizers" / "text.model"


def tiny_overrides(world: Path, out: Path, tokenizer: Path | None = None, **extra: Any) -> dict[str, Any]:
    """Overrides for a quick tiny run: no progress bar, no TensorBoard, 1 torch thread, the session tokenizer."""
    ov: dict[str, Any] = {
        "data.path": str(world),
        "out": str(out),
        "logging.progress": False,
        "logging.tensorboard": False,
        "parallel.threads": 1,
    }
    if tokenizer is not None:
        ov["data.text_tokenizer"] = str(tokenizer)
    ov.update(extra)
    return ov
