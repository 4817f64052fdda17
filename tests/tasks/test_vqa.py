"""vqav2: a tiny fine-tune beats the most-frequent-answer baseline; the vocabulary travels in task.json; scoring
refuses partial files; the official index files give the same records; bad questions are skipped and counted."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from imglish.data import BadRecordCounter, build_answer_vocab
from imglish.evaluation.metrics import vqa_accuracy
from imglish.tasks import get_task
from imglish.training.config import build_config
from imglish.training.evaluate import evaluate, score
from imglish.training.finetune import finetune
from tests.tasks.conftest import tiny_overrides

_EVAL = {"parallel.threads": 1}


def _split_ids(world: Path, split: str) -> set[int]:
    s = json.loads((world / "world.json").read_text())["splits"][split]
    return set(range(s["first_id"], s["stop_id"]))


def _human_answers(world: Path, split: str) -> dict[int, list[str]]:
    """question_id -> the ten raw answers, read straight from the world's files."""
    subtype = "train2014" if split == "train" else "val2014"
    anns = json.loads((world / "vqav2" / f"v2_mscoco_{subtype}_annotations.json").read_text())["annotations"]
    keep = _split_ids(world, split)
    return {a["question_id"]: [x["answer"] for x in a["answers"]] for a in anns if a["image_id"] in keep}


def _task(world: Path, tmp: Path, tokenizer=None, **extra):
    cfg = build_config("tiny", None, tiny_overrides(world, tmp, **extra), task="vqav2")
    return get_task("vqav2")(cfg, world, tokenizer)


@pytest.fixture(scope="module")
def vqa_run(task_world, task_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa_run")
    cfg = build_config("tiny", None, tiny_overrides(task_world, out, task_tokenizer), task="vqav2")
    return finetune(cfg), out


def test_vqa_run_writes_metrics_predictions_and_vocab(vqa_run, task_world):
    summary, out = vqa_run
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["task"] == "vqav2" and doc["split"] == "val" and set(doc["metrics"]) == {"vqa_accuracy"}
    assert doc["skipped"] == 0 and doc["metrics"] == pytest.approx(summary.metrics)
    preds = json.loads((out / "predictions.json").read_text())
    assert sorted(p["question_id"] for p in preds) == sorted(_human_answers(task_world, "val"))
    assert all(set(p) == {"question_id", "answer"} and isinstance(p["answer"], str) for p in preds)


def test_predict_vqa_on_the_finetuned_model_agrees_with_evaluation(vqa_run, task_world):
    """The vqa pipeline on the run's model.safetensors answers each val question as the run's own evaluation did
    (predictions.json), with the vocabulary kept in task.json."""
    import imglish
    from imglish.data.vqav2 import vqa_image_path

    _, out = vqa_run
    preds = {p["question_id"]: p["answer"] for p in json.loads((out / "predictions.json").read_text())}
    questions = json.loads((task_world / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    asked = [q for q in questions["questions"] if q["question_id"] in preds][:8]
    assert asked
    pipe = imglish.pipeline("vqa", out / "model.safetensors", device="cpu")
    images = [vqa_image_path(task_world / "coco", "val2014", q["image_id"]) for q in asked]
    got = pipe(images, question=[q["question"] for q in asked])
    assert [g[0]["answer"] for g in got] == [preds[q["question_id"]] for q in asked]


def test_vqa_learns_above_most_frequent_answer(vqa_run, task_world):
    summary, _ = vqa_run
    anns = json.loads((task_world / "vqav2" / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    top = Counter(a["multiple_choice_answer"] for a in anns).most_common(1)[0][0]
    val = _human_answers(task_world, "val")
    baseline = vqa_accuracy([top] * len(val), list(val.values()))
    assert summary.metrics["vqa_accuracy"] > baseline + 8, (summary.metrics, baseline, top)


def test_score_file_equals_evaluation_and_refuses_partial(vqa_run, task_world):
    summary, out = vqa_run
    preds = json.loads((out / "predictions.json").read_text())
    doc = score("vqav2", task_world, out / "predictions.json", split="val")
    assert doc["metrics"] == pytest.approx(summary.metrics)
    # the same number as the metric applied by hand to the raw answers
    val = _human_answers(task_world, "val")
    by_hand = vqa_accuracy([p["answer"] for p in preds], [val[p["question_id"]] for p in preds])
    assert doc["metrics"]["vqa_accuracy"] == pytest.approx(by_hand)
    with pytest.raises(ValueError, match="no prediction"):
        score("vqav2", task_world, preds[1:], split="val")
    with pytest.raises(ValueError, match="unknown question_id"):
        score("vqav2", task_world, [*preds, {"question_id": 123456789, "answer": "yes"}], split="val")
    with pytest.raises(ValueError, match="must be a string"):
        score("vqav2", task_world, [dict(preds[0], answer=3)] + preds[1:], split="val")


def test_vocab_in_task_json_and_evaluate_reproduces(vqa_run, task_world, tmp_path):
    summary, out = vqa_run
    state = json.loads((out / "task.json").read_text())
    assert state["task"] == "vqav2"
    answers = state["state"]["answers"]
    assert answers == build_answer_vocab([task_world / "vqav2" / "v2_mscoco_train2014_annotations.json"], 1)
    res = evaluate("vqav2", task_world, out / "model.safetensors", tmp_path / "val", progress=False,
                   overrides=_EVAL)
    assert res.metrics == pytest.approx(summary.metrics)
    assert (tmp_path / "val" / "predictions.json").read_text() == (out / "predictions.json").read_text()
    test = evaluate("vqav2", task_world, out / "model.safetensors", tmp_path / "test", split="test", progress=False,
                    overrides=_EVAL)
    preds = json.loads((tmp_path / "test" / "predictions.json").read_text())
    assert sorted(p["question_id"] for p in preds) == sorted(_human_answers(task_world, "test"))
    assert {p["answer"] for p in preds} <= set(answers)
    assert "vqa_accuracy" in test.metrics  # the world's test questions have answers (val2014)


def test_training_drops_questions_outside_the_vocabulary(task_world, tmp_path):
    task = _task(task_world, tmp_path, **{"task.answer_min_count": 100})
    assert 0 < task.num_classes < 10
    skip = BadRecordCounter()
    train = task.dataset("train", skip)
    dropped = skip.counts.get("answer outside vocabulary", 0)
    assert dropped > 0 and len(train) + dropped == len(_human_answers(task_world, "train"))
    # evaluation keeps every answered question, in the vocabulary or not
    assert len(task.eval_sets("val", BadRecordCounter())["records"]) == len(_human_answers(task_world, "val"))
    with pytest.raises(ValueError, match="empty answer vocabulary"):
        _task(task_world, tmp_path, **{"task.answer_min_count": 10**6}).model_kwargs()


def test_official_index_files_give_the_same_records(task_world, task_tokenizer, tmp_path):
    from imglish.data import write_official_index
    from imglish.tokenizers.text import TextTokenizer

    tok = TextTokenizer(task_tokenizer)
    root = tmp_path / "official"
    # rest_val = every val image, so the official val split is the whole world val split
    write_official_index(task_world, root, "vqav2", tok, vqa_min_count=1, vqa_rest_val=1.0)
    world = _task(task_world, tmp_path, tok, **{"task.answer_min_count": 1})
    official = _task(root, tmp_path, tok, **{"task.answer_min_count": 1})
    assert official.answers == world.answers
    skip = BadRecordCounter()
    assert len(official.dataset("train", skip)) == len(world.dataset("train", BadRecordCounter()))
    world_val = world.eval_sets("val", BadRecordCounter())["records"]
    answerable = [it for it in world_val.items
                  if any(a in set(world.answers) for a in it["answers"])]  # the official files drop the others
    off_val = official.eval_sets("val", BadRecordCounter())["records"]
    assert len(off_val) == len(answerable)
    # one record read both ways gives the same tensors (but for the image crop: evaluation transform here)
    a = official.sample(off_val[0], None, train=False)
    b = world.sample(next(world_val[i] for i, it in enumerate(world_val.items)
                          if it["question_id"] == a["question_id"]), None, train=False)
    assert (a["question"] == b["question"]).all() and (a["image"] == b["image"]).all()
    tr = official.dataset("train", BadRecordCounter())
    assert official.sample(tr[0], 3, train=True)["target"].max() > 0
    # the official ground truth keeps soft scores; the test file has none
    gt = official.ground_truth("val", BadRecordCounter())
    assert all(isinstance(v, dict) and v for v in gt.values())
    assert not official.has_answers("test")
    assert len(official.eval_sets("test", BadRecordCounter())["records"]) == len(_human_answers(task_world, "test"))
    with pytest.raises(ValueError, match="has no answers"):
        score("vqav2", root, [{"question_id": 1, "answer": "yes"}], split="test")


def _copy_vqa_world(world: Path, dst: Path, with_world_json: bool = True) -> Path:
    dst.mkdir(parents=True)
    shutil.copytree(world / "vqav2", dst / "vqav2")
    os.symlink(world / "coco", dst / "coco", target_is_directory=True)
    if with_world_json:
        shutil.copy(world / "world.json", dst / "world.json")
    return dst


def test_val_question_without_answers_is_skipped_and_counted(vqa_run, task_world, tmp_path):
    _, out = vqa_run
    broken = _copy_vqa_world(task_world, tmp_path / "broken")
    path = broken / "vqav2" / "v2_mscoco_val2014_annotations.json"
    data = json.loads(path.read_text())
    val_ids = _split_ids(task_world, "val")
    victim = next(a for a in data["annotations"] if a["image_id"] in val_ids)
    victim["answers"] = []
    path.write_text(json.dumps(data))
    task = _task(broken, tmp_path)
    skip = BadRecordCounter()
    assert len(task.eval_sets("val", skip)["records"]) == len(_human_answers(task_world, "val")) - 1
    assert skip.counts == {"no answers": 1}
    assert victim["question_id"] not in task.ground_truth("val", BadRecordCounter())
    res = evaluate("vqav2", broken, out / "model.safetensors", tmp_path / "eval", progress=False,
                   overrides=_EVAL)
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert doc["skipped"] == 1 and doc["bad_records"] == {"no answers": 1} and res.skipped == 1
    assert 0 <= res.metrics["vqa_accuracy"] <= 100


def test_real_layout_without_world_json(task_world, tmp_path):
    """No world.json: val is all of val2014 and test the test2015 questions, which have no answers."""
    real = _copy_vqa_world(task_world, tmp_path / "real", with_world_json=False)
    task = _task(real, tmp_path)
    n_val2014 = len(json.loads((real / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
                    ["questions"])
    assert len(task.eval_sets("val", BadRecordCounter())["records"]) == n_val2014
    with pytest.raises(FileNotFoundError, match="test2015"):
        task.eval_sets("test", BadRecordCounter())
    qs = json.loads((real / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    qs["data_subtype"] = "test2015"
    (real / "vqav2" / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps(qs))
    task = _task(real, tmp_path)
    assert len(task.eval_sets("test", BadRecordCounter())["records"]) == n_val2014
    assert not task.has_answers("test")
    with pytest.raises(ValueError, match="has no answers"):
        task.ground_truth("test", BadRecordCounter())
