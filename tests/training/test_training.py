"""Tests of the pretraining trainer: config, optimizer groups, schedule, checkpoints, the MDM loop, resume after
SIGKILL (bitwise), two-process gloo DDP/FSDP against one process, non-finite skips."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
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
from imglish.training.config import build_config, config_from_dict, config_to_dict
from imglish.training.optim import build_optimizer, lr_factor, param_groups
from imglish.training.pretrain import pretrain
from imglish.training.streams import SampleMaker, StepBatches
from imglish.training.trainer import NonFiniteLossError

DRIVER = Path(__file__).resolve().parent / "driver.py"
BASE = dict(STANDIN_OVERRIDES, **{"data.heldout_batches": 2})


def _run(out: Path, steps: int, **extra):
    ov = dict(BASE, out=str(out), **{"schedule.max_steps": steps})
    ov.update({k.replace("__", "."): v for k, v in extra.pop("ov", {}).items()})
    cfg = build_config("tiny", overrides=ov)
    torch.manual_seed(0)
    sources = make_sources(48, 32, seed=1)
    held = make_sources(16, 32, seed=2)
    return pretrain(
        cfg,
        model=StandInPretraining(CHAR_VOCAB, 8, 32, 8),
        visual_tokenizer=ColourTokenizer(8),
        text_encode=char_encode,
        sources=sources,
        heldout_sources=held,
        vocab_size=CHAR_VOCAB,
        mask_id=CHAR_MASK,
        **extra,
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _final_model(out: Path) -> dict[str, torch.Tensor]:
    return CheckpointManager.load(CheckpointManager(out / "checkpoints").latest())["model"]


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- config
def test_config_precedence_file_then_flags(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"optim": {"lr": 0.5, "weight_decay": 0.1}, "schedule.max_steps": 7}))
    cfg = build_config("tiny", f, {"optim.lr": "0.25", "optim.betas": "0.8,0.9"})
    assert cfg.optim.lr == 0.25 and cfg.optim.weight_decay == 0.1 and cfg.schedule.max_steps == 7
    assert cfg.optim.betas == (0.8, 0.9)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    base = build_config("base")
    assert base.data.image_batch == base.data.text_batch == base.data.pair_batch == 2048


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optim.lrr": "1"}, "did you mean optim.lr"),
        ({"optim.accum_steps": "two"}, "expects an integer"),
        ({"parallel.precision": "fp16"}, "parallel.precision"),
        ({"model.img_size": "30"}, "multiple of model.patch_size"),
        ({"parallel.timeout_s": "-5"}, "parallel.timeout_s must be a positive number of seconds, got -5.0"),
        ({"parallel.prepare_timeout_s": "0"}, "parallel.prepare_timeout_s must be a positive number"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config("tiny", overrides=overrides)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="tiny"):
        build_config("huge")


# ----------------------------------------------------------------------------- optimizer and schedule
def test_param_groups_follow_official_no_decay_rules():
    model = StandInPretraining(CHAR_VOCAB, 8, 32, 8)
    groups = param_groups(model, weight_decay=0.05)
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    params = dict(model.named_parameters())
    assert "beit3.pos" in no_decay  # named by no_weight_decay(), although 3-D
    assert all(params[n].ndim > 1 and not n.endswith(".bias") for n in decay)
    assert all(params[n].ndim <= 1 or n.endswith(".bias") or n == "beit3.pos" for n in no_decay)
    assert "beit3.mask_token" in decay and "beit3.text_embed.weight" in decay  # decayed, as officially
    assert decay | no_decay == set(params)


def test_layer_decay_scales():
    model = StandInPretraining(CHAR_VOCAB, 8, 32, 8, depth=2)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["beit3.text_embed.weight"] == pytest.approx(0.5**3)
    assert scale["beit3.layers.0.mlp.0.weight"] == pytest.approx(0.5**2)
    assert scale["beit3.layers.1.mlp.0.weight"] == pytest.approx(0.5)
    assert scale["mim_head.weight"] == 1.0
    opt = build_optimizer(model, 1e-3, 0.05, layer_decay=0.5)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx(
        [1e-3 * 0.125, 1e-3 * 0.25, 1e-3 * 0.5, 1e-3]
    )


def test_warmup_then_cosine():
    f = [lr_factor(s, 110, 10, 1e-3, 1e-5) for s in range(111)]
    assert f[0] == 0.0 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))
    assert f[110] == pytest.approx(1e-2) and f[60] == pytest.approx(0.01 + 0.99 * 0.5)


# ----------------------------------------------------------------------------- data sampling
def test_step_batches_do_not_depend_on_world_size_or_order():
    maker = SampleMaker(
        char_encode, lambda im: (torch.zeros(3, 32, 32), torch.zeros(3, 32, 32)), 4, 24, CHAR_MASK
    )
    sources = make_sources(20, 32)
    sizes = {"text": 8, "pair": 8}
    one = StepBatches(sources, maker, sizes, seed=3)
    halves = [StepBatches(sources, maker, sizes, seed=3, rank=r, world_size=2, accum_steps=2) for r in (0, 1)]
    for step in (0, 5):  # step 5 wraps around the 20 records (a new epoch order)
        whole = one[step]["text"]["text_ids"]
        parts = torch.cat([h[step * 2 + m]["text"]["text_ids"] for h in halves for m in (0, 1)])
        assert torch.equal(whole, parts)
    assert torch.equal(one[2]["pair"]["text_mask"], one[2]["pair"]["text_mask"])
    assert not torch.equal(one[0]["text"]["text_ids"], one[1]["text"]["text_ids"])
    with pytest.raises(ValueError, match="divisible"):
        StepBatches(sources, maker, {"text": 6}, seed=0, world_size=4)


# ----------------------------------------------------------------------------- training
def test_loss_falls_and_heldout_accuracy_is_reported(tmp_path):
    s = _run(tmp_path / "run", 40, ov={"checkpoint.save_every": 0})
    h = s.history
    first = sum(r["loss"] for r in h[:5]) / 5
    last = sum(r["loss"] for r in h[-5:]) / 5
    assert last < 0.75 * first, (first, last)
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert set(s.heldout) == {"image.mim", "text.mlm", "pair.mlm"}
    for m in s.heldout.values():  # measured on held-out records, next to the most-frequent-token baseline
        assert m["tokens"] > 0 and 0.0 <= m["baseline_accuracy"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["skipped_steps"] == 0


def test_checkpoints_keep_last_k_and_hold_everything(tmp_path):
    out = tmp_path / "run"
    _run(out, 6, ov={"checkpoint.save_every": 2, "checkpoint.keep_last": 2})
    steps = [s for s, _ in CheckpointManager(out / "checkpoints").list()]
    assert steps == [4, 6]
    state = CheckpointManager.load(out / "checkpoints" / "step-00000006.pt")
    assert {"model", "optimizer", "scheduler", "rng", "data", "config", "counters"} <= set(state)
    assert state["data"]["step"] == 6 and state["config"]["schedule"]["max_steps"] == 6
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    nan_at = {3, 4}

    def hook(step, loss):
        return loss * float("nan") if step in nan_at else loss

    s = _run(tmp_path / "a", 8, loss_hook=hook, ov={"checkpoint.save_every": 2})
    assert s.skipped_steps == 2
    assert [r["skipped"] for r in s.history][3:6] == [1.0, 1.0, 0.0]  # hook steps 3, 4 are rows 4, 5

    def always(step, loss):
        return loss * float("inf") if step >= 4 else loss

    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        _run(tmp_path / "b", 20, loss_hook=always, ov={"checkpoint.save_every": 2, "optim.max_bad_steps": 3})
    ckpts = CheckpointManager(tmp_path / "b" / "checkpoints").list()
    assert ckpts[-1][0] == 4  # the last good checkpoint is intact
    state = CheckpointManager.load(ckpts[-1][1])
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    args = ["--schedule.max_steps", "6", "--checkpoint.save_every", "2"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run([sys.executable, str(DRIVER), str(ref), *args], check=True, env=_env())
    killed = subprocess.run(
        [sys.executable, str(DRIVER), str(cut), *args, "--kill-at", "5"], check=False, env=_env()
    )
    assert killed.returncode == -9  # SIGKILL
    assert [s for s, _ in CheckpointManager(cut / "checkpoints").list()] == [2, 4]
    subprocess.run(
        [sys.executable, str(DRIVER), str(cut), *args, "--checkpoint.resume", "true"], check=True, env=_env()
    )
    a, b = _final_model(ref), _final_model(cut)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _history(ref)] == [r["loss"] for r in _history(cut)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_gloo_matches_one_process(tmp_path, strategy):
    """Same global batch on 1 and 2 processes: losses within 1e-5 relative, weights within 1e-4 absolute."""
    args = ["--schedule.max_steps", "4", "--checkpoint.save_every", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(DRIVER), str(one), *args], check=True, env=_env())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(DRIVER),
            str(two),
            *args,
            "--parallel.strategy",
            strategy,
        ],
        check=True,
        env=_env(),
        capture_output=True,
    )
    a, b = _final_model(one), _final_model(two)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-4, worst
    for ra, rb in zip(_history(one), _history(two), strict=True):
        assert math.isclose(ra["loss"], rb["loss"], rel_tol=1e-5), (ra["loss"], rb["loss"])


def test_vqa_tiny_preset_boosts_the_answer_head_as_the_recipe_does():
    import imglish

    cfg = build_config("vqav2_tiny")
    assert cfg.task.head_lr_weight == 20.0
    model = imglish.create_model(cfg.model.name, num_classes=7, img_size=64, patch_size=16)
    groups = param_groups(model, cfg.optim.weight_decay, head_lr_weight=cfg.task.head_lr_weight)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    heads = [n for n in scale if n.startswith("head.")]
    assert heads and all(scale[n] == 20.0 for n in heads)
    # the pooler and the backbone keep the base lr (spec §7: only names starting with "head")
    assert {scale[n] for n in scale if not n.startswith("head.")} == {1.0}
    assert any(n.startswith("pooler") for n in scale)


def test_bad_cls_head_pairs_is_named_before_any_work():
    with pytest.raises(ValueError, match="objective.cls_head_pairs must be 'fused' or 'unimodal', got 'towers'"):
        build_config("tiny", overrides={"objective.cls_head_layers": 1, "objective.cls_head_pairs": "towers"})
