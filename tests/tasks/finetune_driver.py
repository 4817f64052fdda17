"""Runs ``imglish.training.finetune.finetune`` from overrides; used by the subprocess tests (also under torchrun).

usage: python finetune_driver.py TASK [--kill-at STEP] [--section.key VALUE ...]
"""

from __future__ import annotations

import os
import signal
import sys

from imglish.training.config import build_config
from imglish.training.finetune import finetune


def main(argv: list[str]) -> None:
    task, rest = argv[0], argv[1:]
    kill_at = None
    overrides: dict[str, str] = {}
    i = 0
    while i < len(rest):
        if rest[i] == "--kill-at":
            kill_at = int(rest[i + 1])
        else:
            overrides[rest[i].lstrip("-")] = rest[i + 1]
        i += 2
    cfg = build_config("tiny", overrides=overrides, task=task)

    def on_step(trainer, row):
        if kill_at is not None and trainer.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    finetune(cfg, on_step=on_step)


if __name__ == "__main__":
    main(sys.argv[1:])
