"""imagenet: a tiny fine-tune learns far above the majority class; scoring refuses partial files; mixup is seeded."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import imglish
from imglish.training.config import build_config
from imglish.training.evaluate import score
from imglish.training.finetune import finetune
from tests.tasks.conftest import tiny_overrides


@pytest.fixture(scope="module")
def imagenet_run(task_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("imagenet_run")
    cfg = build_config("tiny", None, tiny_overrides(task_world, out, **{"schedule.max_steps": 300, "model.img_size": 32}),
                       task="imagenet")
    return finetune(cfg), out


def test_imagenet_learns_above_majority(imagenet_run, task_world):
    summary, out = imagenet_run
    labels = [p.parent.name for p in (task_world / "imagenet" / "val").rglob("*.JPEG")]
    majority = 100.0 * Counter(labels).most_common(1)[0][1] / len(labels)
    assert summary.metrics["acc1"] > majority + 8, (summary.metrics, majority)
    assert summary.metrics["acc5"] >= summary.metrics["acc1"]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["task"] == "imagenet" and doc["split"] == "val" and set(doc["metrics"]) == {"acc1", "acc5"}
    for name in ("model.safetensors", "processor.json", "predictions.json", "history.jsonl", "task.json"):
        assert (out / name).is_file(), name


def test_score_file_equals_evaluation_and_refuses_partial(imagenet_run, task_world, tmp_path):
    summary, out = imagenet_run
    preds = json.loads((out / "predictions.json").read_text())
    doc = score("imagenet", task_world, out / "predictions.json", split="val")
    assert doc["metrics"] == pytest.approx(summary.metrics)
    with pytest.raises(ValueError, match="no prediction"):
        score("imagenet", task_world, preds[1:], split="val")
    bad = [dict(preds[0], image="nope/x.JPEG")] + preds[1:]
    with pytest.raises(ValueError, match="unknown image"):
        score("imagenet", task_world, bad, split="val")


def test_mixup_cutmix_seeded_and_smoothed(task_world, tmp_path):
    from imglish.tasks import get_task

    cfg = build_config("tiny", None, tiny_overrides(task_world, tmp_path, **{
        "task.mixup": 0.8, "task.cutmix": 1.0, "task.label_smoothing": 0.1}), task="imagenet")
    task = get_task("imagenet")(cfg, task_world)
    batch = {"image": torch.rand(4, 3, 64, 64), "label": torch.tensor([0, 1, 2, 3])}
    a, b = task.batch_transform(dict(batch), 7), task.batch_transform(dict(batch), 7)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    assert torch.allclose(a["target"].sum(-1), torch.ones(4))
    assert float(a["target"].min()) >= 0.1 / task.num_classes - 1e-6  # smoothing floor
    assert not torch.equal(a["image"], batch["image"])


def test_predict_classify_on_the_finetuned_model_agrees_with_evaluation(imagenet_run, task_world, capsys):
    """`imglish predict classify` on the run's model.safetensors gives, per val image, the top-5 of the run's own
    evaluation (predictions.json), named by the class folders kept in task.json."""
    from imglish.cli.main import main

    _, out = imagenet_run
    preds = {p["image"]: p for p in json.loads((out / "predictions.json").read_text())[:6]}
    classes = json.loads((out / "task.json").read_text())["state"]["classes"]
    paths = [str(task_world / "imagenet" / "val" / rel) for rel in preds]
    assert main(["predict", "classify", "--checkpoint", str(out / "model.safetensors"), *paths, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for row, (rel, pred) in zip(rows, preds.items()):
        assert [r["label"] for r in row["result"]] == [classes[k] for k in pred["top5"]], rel


def test_a_vision_only_finetune_matches_the_full_model(task_world, tmp_path):
    """model.modalities=vision from a full checkpoint: the same training and predictions with a smaller model."""
    from safetensors import safe_open

    quick = {"model.img_size": 32, "task.batch_size": 8, "task.max_eval_examples": 16, "schedule.max_steps": 4,
             "schedule.warmup_steps": 1, "checkpoint.save_every": 0, "model.drop_path_rate": 0.0}
    start = tmp_path / "start"
    finetune(build_config("tiny", None, tiny_overrides(task_world, start, **quick), task="imagenet"))
    runs = {}
    for modalities in ("all", "vision"):
        out = tmp_path / modalities
        cfg = build_config("tiny", None, tiny_overrides(task_world, out, **quick, **{
            "model.init_from": str(start / "model.safetensors"), "model.modalities": modalities}), task="imagenet")
        runs[modalities] = finetune(cfg), out
    (full, full_out), (vision, vision_out) = runs["all"], runs["vision"]
    assert vision.metrics == full.metrics
    assert json.loads((vision_out / "predictions.json").read_text()) == json.loads(
        (full_out / "predictions.json").read_text())
    with safe_open(str(vision_out / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and not any("text_embed" in k or ".B." in k for k in keys)
    small, big = vision_out / "model.safetensors", full_out / "model.safetensors"
    assert small.stat().st_size < 0.7 * big.stat().st_size
    assert imglish.create_model(None, pretrained=small).config.modalities == ("vision",)


def test_vision_only_is_refused_where_it_cannot_apply(task_world, task_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="model.modalities must be 'all' or 'vision'"):
        build_config("tiny", None, tiny_overrides(task_world, tmp_path, **{"model.modalities": "text"}),
                     task="imagenet")
    with pytest.raises(ValueError, match="pretraining trains both modalities"):
        build_config("tiny", None, {"out": str(tmp_path), "model.modalities": "vision"})
    cfg = build_config("tiny", None, tiny_overrides(task_world, tmp_path, task_tokenizer, **{
        "model.modalities": "vision", "model.img_size": 32}), task="vqav2")
    with pytest.raises(ValueError, match="drops the text weights, but task 'vqav2' reads text"):
        finetune(cfg)
