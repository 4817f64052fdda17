"""Runs ``imglish.training.pretrain`` on the stand-ins of ``standin.py``; used by the subprocess tests.

usage: python driver.py OUT [--kill-at STEP] [--section.key VALUE ...]   (also under torchrun)
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from standin import (
    CHAR_MASK,
    CHAR_VOCAB,
    STANDIN_OVERRIDES,
    ColourTokenizer,
    StandInPretraining,
    char_encode,
    make_sources,
)

from imglish.training.config import build_config
from imglish.training.pretrain import pretrain

BASE = dict(STANDIN_OVERRIDES)


def main(argv: list[str]) -> None:
    out, rest = argv[0], argv[1:]
    kill_at = None
    overrides = dict(BASE)
    i = 0
    while i < len(rest):
        if rest[i] == "--kill-at":
            kill_at = int(rest[i + 1])
        else:
            overrides[rest[i].lstrip("-")] = rest[i + 1]
        i += 2
    overrides["out"] = out
    cfg = build_config("tiny", overrides=overrides)
    torch.manual_seed(cfg.seed)
    model = StandInPretraining(CHAR_VOCAB, 8, cfg.model.img_size, cfg.model.patch_size)

    def on_step(trainer, row):
        if kill_at is not None and trainer.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sources = make_sources(48, cfg.model.img_size, seed=1)
    pretrain(
        cfg,
        model=model,
        visual_tokenizer=ColourTokenizer(cfg.model.patch_size),
        text_encode=char_encode,
        sources=sources,
        heldout_sources=sources,
        vocab_size=CHAR_VOCAB,
        mask_id=CHAR_MASK,
        on_step=on_step,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
