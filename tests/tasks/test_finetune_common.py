"""What every task shares: bitwise resume after SIGKILL, official-layout checkpoints through `evaluate`, clear
errors for a checkpoint of another task or size, unknown tasks and presets, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import imglish
from imglish.training.checkpoint import CheckpointManager
from imglish.training.config import build_config
from imglish.training.evaluate import evaluate
from tests.tasks.conftest import tiny_overrides

DRIVER = Path(__file__).resolve().parent / "finetune_driver.py"
REPO = Path(__file__).resolve().parents[2]

# A quick imagenet run that exercises every random source: drop path, RandAugment, random erasing, mixup/cutmix,
# and a periodic evaluation between checkpoints.
_QUICK = {
    "model.img_size": "32",
    "model.drop_path_rate": "0.1",
    "task.batch_size": "8",
    "task.mixup": "0.8",
    "task.cutmix": "1.0",
    "task.eval_every": "3",
    "task.max_eval_examples": "8",
    "schedule.max_steps": "6",
    "schedule.warmup_steps": "2",
    "checkpoint.save_every": "2",
    "logging.progress": "false",
    "logging.tensorboard": "false",
    "parallel.threads": "1",
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(out: Path, world: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    args = [x for k, v in _QUICK.items() for x in (f"--{k}", v)]
    cmd = [sys.executable, str(DRIVER), "imagenet", "--data.path", str(world), "--out", str(out), *args, *extra]
    return subprocess.run(cmd, check=check, env=_env(), capture_output=True, text=True)


def test_sigkill_then_resume_is_bitwise_identical(task_world, tmp_path):
    from safetensors.torch import load_file

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _run(ref, task_world)
    killed = _run(cut, task_world, "--kill-at", "5", check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [s for s, _ in CheckpointManager(cut / "checkpoints").list()] == [2, 4]
    _run(cut, task_world, "--checkpoint.resume", "true")
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def rows(run: Path) -> list[dict]:  # the logged rows, without the wall-clock throughput
        lines = (run / "history.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"} for x in lines]

    assert rows(ref) == rows(cut)
    assert any("eval/acc1" in r for r in rows(ref))  # the periodic evaluation ran between checkpoints
    assert json.loads((ref / "metrics.json").read_text()) == json.loads((cut / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tiny_imagenet_checkpoint(task_world, tmp_path_factory):
    """An imagenet model (random weights) saved in our format and in the official layout, with a Processor."""
    from imglish.model.convert import to_official
    from imglish.tasks import get_task

    folder = tmp_path_factory.mktemp("ckpt")
    cfg = build_config("tiny", None, tiny_overrides(task_world, folder), task="imagenet")
    task = get_task("imagenet")(cfg, task_world)
    torch.manual_seed(0)
    model = imglish.create_model(cfg.model.name, img_size=64, patch_size=8, num_classes=task.num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = folder / "ours" / "model.safetensors"
    ours.parent.mkdir()
    imglish.save_model(model, ours)
    official = folder / "official.pth"
    torch.save({"model": to_official(model.state_dict())}, official)
    return ours, official


def test_official_layout_checkpoint_evaluates_like_ours(tiny_imagenet_checkpoint, task_world, tmp_path):
    ours, official = tiny_imagenet_checkpoint
    ov = {"logging.progress": "false", "model.img_size": 64, "model.patch_size": 8}
    a = evaluate("imagenet", task_world, ours, tmp_path / "a", overrides=ov, progress=False)
    b = evaluate("imagenet", task_world, official, tmp_path / "b", model="beit3_tiny_patch16_224_imageclassification",
                 overrides=ov, progress=False)
    assert a.metrics == b.metrics
    assert json.loads((tmp_path / "a" / "predictions.json").read_text()) == json.loads(
        (tmp_path / "b" / "predictions.json").read_text())


def test_checkpoint_of_another_task_or_size_is_a_clear_error(tiny_imagenet_checkpoint, task_world, tmp_path):
    ours, official = tiny_imagenet_checkpoint
    with pytest.raises(ValueError, match=r"holds a 'imageclassification' model.*needs a 'nlvr2'"):
        evaluate("nlvr2", task_world, ours, tmp_path, overrides={"data.text_tokenizer": "x"}, progress=False)
    with pytest.raises(ValueError, match=r"official\.pth does not fit the model 'beit3_small_patch16_224_imageclass"):
        evaluate("imagenet", task_world, official, tmp_path, model="beit3_small_patch16_224_imageclassification",
                 overrides={"model.img_size": 64, "model.patch_size": 8}, progress=False)
    with pytest.raises(ValueError, match="is a vqav2 model"):
        evaluate("imagenet", task_world, official, tmp_path, model="beit3_tiny_patch16_224_vqav2", progress=False)


def test_unknown_task_and_preset_list_the_valid_names():
    with pytest.raises(ValueError, match="expected one of imagenet_base, imagenet_large, imagenet_tiny"):
        build_config("huge", task="imagenet")
    with pytest.raises(ValueError, match="unknown task 'mnist'.*vqav2"):
        build_config("tiny", overrides={"task.name": "mnist"})
    from imglish.tasks import get_task

    with pytest.raises(ValueError, match="unknown task 'mnist'"):
        get_task("mnist")


def test_cli_score_and_bad_predictions_file(tiny_imagenet_checkpoint, task_world, tmp_path, capsys):
    from imglish.cli.main import main

    ours, _ = tiny_imagenet_checkpoint
    rc = main(["evaluate", "imagenet", "--data", str(task_world), "--checkpoint", str(ours), "--out", str(tmp_path),
               "--logging.progress", "false"])
    assert rc == 0
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["score", "imagenet", "--data", str(task_world), "--predictions", str(tmp_path / "predictions.json")]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == evaluated["metrics"]
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["score", "imagenet", "--data", str(task_world), "--predictions", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["score", "imagenet", "--data", str(task_world), "--predictions", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_finetune_matches_one_process(task_world, tmp_path, strategy):
    """The same global batch on 1 and 2 gloo processes: weights within 1e-4, the same final evaluation."""
    from safetensors.torch import load_file

    quick = {**_QUICK, "model.drop_path_rate": "0", "task.mixup": "0", "task.cutmix": "0", "task.randaug": "false",
             "task.random_erasing": "0", "schedule.max_steps": "3", "checkpoint.save_every": "0"}
    args = [x for k, v in quick.items() for x in (f"--{k}", v)]
    one, two = tmp_path / "one", tmp_path / "two"
    base = ["imagenet", "--data.path", str(task_world), *args, "--parallel.backend", "gloo", "--parallel.device", "cpu"]
    subprocess.run([sys.executable, str(DRIVER), *base, "--out", str(one)], check=True, env=_env())
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(DRIVER), *base, "--out", str(two), "--parallel.strategy", strategy],
                   check=True, env=_env(), capture_output=True, text=True)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    ma = json.loads((one / "metrics.json").read_text())
    mb = json.loads((two / "metrics.json").read_text())
    assert ma["metrics"] == pytest.approx(mb["metrics"], abs=1e-6) and ma["skipped"] == mb["skipped"] == 0
