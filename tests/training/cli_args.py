"""Command lines for short real-model `imglish pretrain` runs in tests: tiny images, tokenizers and batches."""

from __future__ import annotations

from pathlib import Path

TINY_RUN_FLAGS: dict[str, str] = {
    "--model.img_size": "32",
    "--data.visual_tokenizer_steps": "2",
    "--data.visual_tokenizer_codes": "16",
    "--data.text_vocab_size": "120",
    "--data.image_batch": "4",
    "--data.text_batch": "4",
    "--data.pair_batch": "4",
    "--data.heldout_batches": "1",
    "--logging.progress": "false",
    "--logging.tensorboard": "false",
    "--save-every": "0",
    "--parallel.threads": "1",
}


def tiny_pretrain_args(data: Path, out: Path, steps: int, **flags: str) -> list[str]:
    """`pretrain` argv: the tiny run flags, with `flags` (`{"--data.format": "wds"}`-style keys) added or replacing."""
    merged = {**TINY_RUN_FLAGS, **flags}
    argv = ["pretrain", "--data", str(data), "--out", str(out), "--max-steps", str(steps)]
    for key, value in merged.items():
        argv += [key, value]
    return argv


def torchrun_pretrain_cmd(data: Path, out: Path, steps: int, **flags: str) -> list[str]:
    """The same run under ``torchrun --standalone --nproc_per_node 2`` on gloo and the CPU (a full command line)."""
    import sys

    flags = {"--parallel.backend": "gloo", "--parallel.device": "cpu", **flags}
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "imglish.cli.main", *tiny_pretrain_args(data, out, steps, **flags)]
