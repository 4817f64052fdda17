"""nlvr2: the tiny preset learns above the majority label on a 2000-image world (from random weights, in a quick
run, it learns the statements' language prior, not the pictures: docs/finetuning.md); a tiny fine-tune writes its
metrics and predictions; scoring refuses partial files; the official index files give the same records; an example
with a missing image is skipped and counted in training and in evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from imglish.data import BadRecordCounter
from imglish.data.synthetic import WorldConfig, generate_world
from imglish.tasks import get_task
from imglish.training.config import build_config
from imglish.training.evaluate import evaluate, score
from imglish.training.finetune import finetune
from tests.tasks.conftest import tiny_overrides

# The tiny preset (32-pixel images in 16-pixel patches, 16 pairs a step), shorter.
_QUICK = {"schedule.max_steps": 40, "schedule.warmup_steps": 4}
_EVAL = {"parallel.threads": 1}


def _labels(world: Path, name: str) -> dict[str, int]:
    lines = (world / "nlvr2" / name).read_text().splitlines()
    return {r["identifier"]: int(r["label"] == "True") for r in map(json.loads, lines)}


def _task(world: Path, tmp: Path, tokenizer=None, **extra):
    cfg = build_config("tiny", None, tiny_overrides(world, tmp, **extra), task="nlvr2")
    return get_task("nlvr2")(cfg, world, tokenizer)


@pytest.fixture(scope="module")
def nlvr2_run(task_world, task_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("nlvr2_run")
    cfg = build_config("tiny", None, tiny_overrides(task_world, out, task_tokenizer, **_QUICK), task="nlvr2")
    return finetune(cfg), out


@pytest.fixture(scope="module")
def nlvr2_world(tmp_path_factory) -> Path:
    """NLVR2 only, 2000 scenes, 4 pairs per image (the default): 6400 training pairs, 800 dev pairs."""
    root = tmp_path_factory.mktemp("nlvr2_world") / "w"
    generate_world(WorldConfig(num_images=2000, seed=5, workers=1, formats=("nlvr2",)), root)
    return root


def test_tiny_preset_learns_above_majority(nlvr2_world, task_tokenizer, tmp_path):
    """The tiny preset as it is (100 steps of 16 pairs): the dev accuracy clears the majority label by 4 points
    (measured 67.0 against 59.0)."""
    out = tmp_path / "run"
    summary = finetune(build_config("tiny", None, tiny_overrides(nlvr2_world, out, task_tokenizer), task="nlvr2"))
    dev = _labels(nlvr2_world, "dev.json")
    majority = 100.0 * max(sum(dev.values()), len(dev) - sum(dev.values())) / len(dev)
    assert summary.metrics["accuracy"] > majority + 4, (summary.metrics, majority)


def test_nlvr2_run_writes_metrics_and_predictions(nlvr2_run, task_world):
    summary, out = nlvr2_run
    val = _labels(task_world, "dev.json")
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["task"] == "nlvr2" and doc["split"] == "val" and set(doc["metrics"]) == {"accuracy"}
    assert doc["skipped"] == 0 and doc["metrics"] == pytest.approx(summary.metrics)
    preds = json.loads((out / "predictions.json").read_text())
    assert sorted(p["identifier"] for p in preds) == sorted(val)
    assert all(set(p) == {"identifier", "label"} and p["label"] in (0, 1) for p in preds)
    assert json.loads((out / "task.json").read_text())["task"] == "nlvr2"


def test_score_file_equals_evaluation_and_refuses_partial(nlvr2_run, task_world, tmp_path):
    summary, out = nlvr2_run
    preds = json.loads((out / "predictions.json").read_text())
    doc = score("nlvr2", task_world, out / "predictions.json", split="val")
    assert doc["metrics"] == pytest.approx(summary.metrics)
    val = _labels(task_world, "dev.json")
    assert doc["metrics"]["accuracy"] == pytest.approx(
        100.0 * sum(p["label"] == val[p["identifier"]] for p in preds) / len(val))
    with pytest.raises(ValueError, match="no prediction"):
        score("nlvr2", task_world, preds[1:], split="val")
    with pytest.raises(ValueError, match="unknown identifier"):
        score("nlvr2", task_world, [*preds, {"identifier": "dev-999-0-0", "label": 1}], split="val")
    with pytest.raises(ValueError, match="0 or 1"):
        score("nlvr2", task_world, [dict(preds[0], label="True")] + preds[1:], split="val")
    res = evaluate("nlvr2", task_world, out / "model.safetensors", tmp_path / "ev", progress=False,
                   overrides=_EVAL)
    assert res.metrics == pytest.approx(summary.metrics)


def test_official_index_files_give_the_same_records(task_world, task_tokenizer, tmp_path):
    from imglish.data import write_official_index
    from imglish.tokenizers.text import TextTokenizer

    tok = TextTokenizer(task_tokenizer)
    root = tmp_path / "official"
    write_official_index(task_world, root, "nlvr2", tok)
    world, official = _task(task_world, tmp_path, tok), _task(root, tmp_path, tok)
    for split in ("train", "val", "test"):
        assert len(official.dataset(split, BadRecordCounter())) == len(world.dataset(split, BadRecordCounter()))
        assert official.ground_truth(split, None) == world.ground_truth(split, None)
    a = official.sample(official.dataset("val", None)[0], None, train=False)
    b = world.sample(world.dataset("val", None)[0], None, train=False)
    assert a["identifier"] == b["identifier"] and int(a["label"]) == int(b["label"])
    for key in ("image", "image2", "text", "padding_mask"):
        assert (a[key] == b[key]).all(), key


def test_two_images_are_augmented_independently_and_seeded(task_world, task_tokenizer, tmp_path):
    from imglish.tokenizers.text import TextTokenizer

    task = _task(task_world, tmp_path, TextTokenizer(task_tokenizer))
    rec = task.dataset("train", None)[0]
    rec = dict(rec, image2=rec["image"])  # the same picture on both sides
    s1, s2 = task.sample(rec, 11, train=True), task.sample(rec, 11, train=True)
    assert (s1["image"] == s2["image"]).all() and (s1["image2"] == s2["image2"]).all()
    assert not (s1["image"] == s1["image2"]).all()
    assert not (task.sample(rec, 12, train=True)["image"] == s1["image"]).all()


def test_missing_image_is_skipped_and_counted(task_world, task_tokenizer, tmp_path):
    """A copy of the world's NLVR2 data with images deleted: training replaces and counts the examples, evaluation
    skips and counts the one dev example."""
    broken = tmp_path / "broken"
    shutil.copytree(task_world / "nlvr2", broken / "nlvr2")
    train = [json.loads(x) for x in (broken / "nlvr2" / "train.json").read_text().splitlines()]
    for rec in train[::2]:  # half the training pairs lose their right image
        prefix = rec["identifier"].rsplit("-", 1)[0]
        (broken / "nlvr2" / "images" / "train" / str(rec["directory"]) / f"{prefix}-img1.png").unlink()
    dev = json.loads((broken / "nlvr2" / "dev.json").read_text().splitlines()[0])
    (broken / "nlvr2" / "images" / "dev" / f"{dev['identifier'].rsplit('-', 1)[0]}-img0.png").unlink()
    out = tmp_path / "out"
    cfg = build_config("tiny", None, tiny_overrides(broken, out, task_tokenizer, **{
        **_QUICK, "schedule.max_steps": 2, "schedule.warmup_steps": 0, "task.batch_size": 8}), task="nlvr2")
    summary = finetune(cfg)
    assert summary.bad_records.get("image missing", 0) >= 1, summary.bad_records
    assert summary.eval_skipped == 1
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["skipped"] == 1 and doc["bad_records"] == {"image missing": 1}
    preds = json.loads((out / "predictions.json").read_text())
    assert dev["identifier"] not in {p["identifier"] for p in preds}
    assert len(preds) == len(_labels(task_world, "dev.json")) - 1
    # the file of the skipped example is scored over what was predicted only when asked to
    with pytest.raises(ValueError, match="no prediction"):
        score("nlvr2", broken, preds, split="val")
