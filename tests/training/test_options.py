"""The trainer's options, each against the plain run: gradient accumulation, activation checkpointing, bf16
autocast, torch.compile, image masking in the pair stream (stand-in model, a few steps)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from standin import (
    CHAR_MASK,
    CHAR_VOCAB,
    STANDIN_OVERRIDES,
    ColourTokenizer,
    StandInPretraining,
    char_encode,
    make_sources,
)

from imglish.training.checkpoint import CheckpointManager
from imglish.training.config import build_config
from imglish.training.pretrain import pretrain
from imglish.training.streams import SampleMaker, StepBatches

BASE = dict(STANDIN_OVERRIDES, **{"schedule.warmup_steps": 1, "checkpoint.save_every": 0})


def _run(out: Path, steps: int, model: torch.nn.Module | None = None, **overrides):
    ov = dict(BASE, out=str(out), **{"schedule.max_steps": steps})
    ov.update({k.replace("__", "."): v for k, v in overrides.items()})
    cfg = build_config("tiny", overrides=ov)
    torch.manual_seed(0)
    sources = make_sources(48, 32, seed=1)
    model = model if model is not None else StandInPretraining(CHAR_VOCAB, 8, 32, 8)
    summary = pretrain(
        cfg,
        model=model,
        visual_tokenizer=ColourTokenizer(8),
        text_encode=char_encode,
        sources=sources,
        heldout_sources=make_sources(16, 32, seed=2),
        vocab_size=CHAR_VOCAB,
        mask_id=CHAR_MASK,
    )
    weights = CheckpointManager.load(CheckpointManager(out / "checkpoints").latest())["model"]
    return summary, weights


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The reference: fp32, one micro-batch per step, no checkpointing, eager; 4 steps."""
    return _run(tmp_path_factory.mktemp("plain") / "run", 4)


def test_gradient_accumulation_equals_the_whole_batch(plain, tmp_path):
    """accum_steps=4 (micro-batches of 2) vs accum_steps=1 (batches of 8): the same global batch, so the same
    update. Tolerance: weights within 1e-5 absolute, per-step losses within 1e-5 relative (float32 summation
    order is the only difference)."""
    summary, weights = _run(tmp_path / "acc", 4, optim__accum_steps=4)
    assert _max_diff(plain[1], weights) < 1e-5
    for a, b in zip(plain[0].history, summary.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert plain[1]["mim_head.weight"].ne(StandInPretraining(CHAR_VOCAB, 8, 32, 8).mim_head.weight).any()


def test_activation_checkpointing_gives_the_same_weights(plain, tmp_path):
    model = StandInPretraining(CHAR_VOCAB, 8, 32, 8)
    calls = []
    orig = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    torch.utils.checkpoint.checkpoint = counting
    try:
        _, weights = _run(tmp_path / "ac", 4, model=model, parallel__activation_checkpointing="true")
    finally:
        torch.utils.checkpoint.checkpoint = orig
    assert model.beit3.grad_ckpt and len(calls) > 0  # the blocks really were recomputed
    assert _max_diff(plain[1], weights) < 1e-6


def test_activation_checkpointing_setting_reads_booleans_and_mode_names(tmp_path):
    def setting(value):
        return build_config("tiny", overrides={"parallel.activation_checkpointing": value}).parallel

    assert setting("true").activation_checkpointing is True
    assert setting("off").activation_checkpointing is False
    assert setting("selective").activation_checkpointing == "selective"
    with pytest.raises(ValueError, match="activation_checkpointing"):
        setting("sometimes")


def test_selective_activation_checkpointing_reaches_the_model(plain, tmp_path):
    model = StandInPretraining(CHAR_VOCAB, 8, 32, 8)
    _, weights = _run(tmp_path / "sac", 4, model=model, parallel__activation_checkpointing="selective")
    assert model.beit3.grad_ckpt == "selective"
    assert _max_diff(plain[1], weights) < 1e-6


def test_bf16_autocast_runs_in_bf16_and_tracks_fp32(plain, tmp_path):
    model = StandInPretraining(CHAR_VOCAB, 8, 32, 8)
    dtypes = set()
    model.mlm_head.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    summary, weights = _run(tmp_path / "bf16", 4, model=model, parallel__precision="bf16")
    assert dtypes == {torch.bfloat16}
    assert all(v.dtype == torch.float32 for v in weights.values())  # master weights stay fp32
    # bf16 rounding moves the losses a little, not more: within 3% of the fp32 run at every step
    for a, b in zip(plain[0].history, summary.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-2)
    assert summary.skipped_steps == 0


def test_torch_compile_matches_eager(plain, tmp_path):
    """Per-block torch.compile through AOTAutograd (the ``aot_eager`` backend: the same graph capture and
    compiled backward as inductor, without generating C++ kernels, which takes a minute on 2 cores)."""
    model = StandInPretraining(CHAR_VOCAB, 8, 32, 8)
    summary, weights = _run(
        tmp_path / "compiled", 4, model=model, parallel__compile="true", parallel__compile_backend="aot_eager"
    )
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in model.beit3.layers)
    assert not any("_orig_mod" in k for k in weights)  # checkpoints keep the plain names
    assert _max_diff(plain[1], weights) < 1e-4
    for a, b in zip(plain[0].history, summary.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_pair_image_masking_adds_a_pair_mim_term(tmp_path):
    maker = SampleMaker(
        char_encode,
        lambda im: (torch.zeros(3, 32, 32), torch.zeros(3, 32, 32)),
        4,
        24,
        CHAR_MASK,
        pair_image_mask_ratio=0.25,
        min_block_patches=2,
    )
    batch = StepBatches(make_sources(16, 32), maker, {"pair": 8, "image": 8}, seed=0)[0]
    assert batch["pair"]["image_mask"].sum(1).tolist() == [4] * 8  # exactly 25% of the 16 patches
    assert batch["image"]["image_mask"].sum(1).tolist() == [round(0.4 * 16)] * 8
    summary, _ = _run(
        tmp_path / "pairmim", 3, objective__pair_image_mask_ratio="0.25", data__heldout_batches="1"
    )
    assert all("loss/pair.mim" in row and row["loss/pair.mim"] > 0 for row in summary.history)
    assert set(summary.heldout) == {"image.mim", "text.mlm", "pair.mlm", "pair.mim"}
    off, _ = _run(tmp_path / "nomim", 1)
    assert "loss/pair.mim" not in off.history[0]


def test_time_limit_stops_early_at_a_checkpoint(tmp_path):
    summary, _ = _run(tmp_path / "limited", 50, schedule__time_limit_s="1e-6")
    assert summary.stopped_early and summary.steps == 1
    assert [s for s, _ in CheckpointManager(tmp_path / "limited" / "checkpoints").list()] == [1]
    assert (tmp_path / "limited" / "model.safetensors").exists()
