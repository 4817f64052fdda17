"""`imglish pretrain` under torchrun (FSDP) from an empty run folder: rank 0 trains the tokenizers alone (no
collective the other rank would never enter), both ranks then pretrain, and the held-out evaluation runs on the
exported model. This used to hang in the VQ-KD k-means broadcast (and FSDP skipped the held-out evaluation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from imglish.data.synthetic import WorldConfig, generate_world

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import torchrun_pretrain_cmd  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_two_process_pretrain_trains_its_tokenizers_without_hanging(tmp_path):
    world = tmp_path / "world"
    generate_world(WorldConfig(num_images=40, seed=2, workers=1, formats=("coco", "imagenet", "text")), world)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = torchrun_pretrain_cmd(world, run, 2, **{"--data.visual_tokenizer_steps": "3",
                                                  "--parallel.strategy": "fsdp"})
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "tokenizers" / "vqkd" / "vqkd.safetensors").is_file()
    assert (run / "tokenizers" / "text.model").is_file()
    assert (run / "model.safetensors").is_file()
    heldout = json.loads((run / "summary.json").read_text())["heldout"]
    assert {"image.mim", "text.mlm"} <= set(heldout)
    assert all(0.0 <= term["accuracy"] <= 1.0 for term in heldout.values())
