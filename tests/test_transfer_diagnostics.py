"""tools/transfer_diagnostics.py: the probe reads a linear class, the commands run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import transfer_diagnostics as td  # noqa: E402


def test_linear_probe_reads_a_linear_class_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=gen)
    x = torch.randn(300, 8, generator=gen)
    x[:, 0] += 8.0 * y  # the class is one direction of the features
    assert td.linear_probe(x[:200], y[:200], x[200:], y[200:]) > 95.0
    noise = torch.randn(300, 8, generator=gen)
    assert td.linear_probe(noise[:200], y[:200], noise[200:], y[200:]) < 60.0


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from imglish.data import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(WorldConfig(num_images=60, seed=3, workers=1, formats=("coco", "imagenet", "text")), out)
    return out


def test_commands_run_on_a_tiny_world(world, tmp_path, capsys):
    td.main(["probe", "random", "--data", str(world), "--labels", "30"])
    assert "val accuracy by layer 1..4" in capsys.readouterr().out
    td.main(["cnn", "--data", str(world), "--labels", "30", "--steps", "3"])
    assert "supervised CNN, 30 labels, 3 steps of 32: test accuracy" in capsys.readouterr().out
    from imglish.tokenizers.text import train_sentencepiece

    texts = world / "text" / "train.txt"
    spm = train_sentencepiece([texts], 120, tmp_path / "text.model", model_type="bpe",
                              extra_options={"hard_vocab_limit": False})
    td.main(["cnn-clip", "--data", str(world), "--text-tokenizer", str(spm), "--out", str(tmp_path / "clip"),
             "--steps", "2", "--batch", "8", "--codes", "4"])
    out = capsys.readouterr().out
    assert "probe on the mean patch feature" in out and "k-means codes (k=4)" in out
    td.main(["probe-codes", str(tmp_path / "clip" / "kmeans.safetensors"), "--data", str(world), "--labels", "30"])
    assert "linear probe on the bag of visual codes" in capsys.readouterr().out
