"""coco_retrieval / flickr30k: a tiny fine-tune beats chance recall; the rankings file scores to the evaluation's
numbers (ties included); two gloo processes evaluate exactly like one; both data layouts (Karpathy JSON, official
index files) give the same records."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imglish.training.config import build_config
from imglish.training.evaluate import evaluate, score
from imglish.training.finetune import finetune
from tests.tasks.conftest import tiny_overrides


@pytest.fixture(scope="module")
def retrieval_run(task_world, task_tokenizer, tmp_path_factory):
    """The tiny preset as it is (150 steps of 64 captions, lr 3e-5, patch 16): a from-scratch dual encoder needs
    them; fewer steps or a higher lr stay on the ln(batch) plateau of collapsed features."""
    out = tmp_path_factory.mktemp("retrieval_run")
    cfg = build_config("tiny", None, tiny_overrides(task_world, out, task_tokenizer), task="coco_retrieval")
    return finetune(cfg), out


def _val_catalog(world: Path) -> dict[int, int]:
    """``{image id: number of captions}`` of the world's COCO Karpathy val split."""
    data = json.loads((world / "coco" / "dataset_coco.json").read_text())
    return {e["cocoid"]: sum(bool(s["raw"].strip()) for s in e["sentences"])
            for e in data["images"] if e["split"] == "val"}


def _chance(captions: dict[int, int]) -> dict[str, float]:
    """Expected recall (percent) of a random ranking: IR@k = k/n; TR@k = 1 - C(T - c, k) / C(T, k) per image."""
    n, total = len(captions), sum(captions.values())
    out = {}
    for k in (1, 5, 10):
        out[f"tr_r{k}"] = 100.0 * sum(1 - math.comb(total - c, k) / math.comb(total, k) for c in captions.values()) / n
    for k in (1, 5, 10):
        out[f"ir_r{k}"] = 100.0 * min(k, n) / n
    out["r_mean"] = sum(out.values()) / 6
    return out


def test_coco_retrieval_learns_above_chance(retrieval_run, task_world):
    summary, out = retrieval_run
    chance = _chance(_val_catalog(task_world))
    m = summary.metrics
    assert set(m) == {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean"}
    assert m["r_mean"] > chance["r_mean"] + 12, (m, chance)
    assert m["ir_r10"] > chance["ir_r10"] + 15 and m["tr_r10"] > chance["tr_r10"] + 15, (m, chance)
    assert m["tr_r1"] <= m["tr_r5"] <= m["tr_r10"] and m["ir_r1"] <= m["ir_r5"] <= m["ir_r10"]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["task"] == "coco_retrieval" and doc["split"] == "val" and doc["metrics"] == pytest.approx(m)
    for name in ("model.safetensors", "processor.json", "predictions.json", "task.json"):
        assert (out / name).is_file(), name


def test_rankings_score_equals_evaluation_and_refuse_bad_files(retrieval_run, task_world):
    summary, out = retrieval_run
    preds = json.loads((out / "predictions.json").read_text())
    captions = _val_catalog(task_world)
    assert len(preds["image_to_text"]) == len(captions)
    assert len(preds["text_to_image"]) == sum(captions.values())
    first = preds["image_to_text"][0]
    assert len(first["text_ids"]) == 10 and all(t.split("#")[0].isdigit() for t in first["text_ids"])
    assert len(preds["text_to_image"][0]["image_ids"]) == 10
    doc = score("coco_retrieval", task_world, out / "predictions.json", split="val")
    assert doc["metrics"] == pytest.approx(summary.metrics, abs=1e-9)

    partial = {**preds, "text_to_image": preds["text_to_image"][1:]}
    with pytest.raises(ValueError, match="no prediction"):
        score("coco_retrieval", task_world, partial, split="val")
    unknown = {**preds, "image_to_text": [dict(first, image_id=-1)] + preds["image_to_text"][1:]}
    with pytest.raises(ValueError, match="unknown image_id"):
        score("coco_retrieval", task_world, unknown, split="val")
    short = {**preds, "image_to_text": [dict(first, text_ids=first["text_ids"][:9])] + preds["image_to_text"][1:]}
    with pytest.raises(ValueError, match="at least 10"):
        score("coco_retrieval", task_world, short, split="val")
    stranger = {**preds, "image_to_text": [dict(first, text_ids=["nope#0"] + first["text_ids"][1:])]
                + preds["image_to_text"][1:]}
    with pytest.raises(ValueError, match="unknown text_id"):
        score("coco_retrieval", task_world, stranger, split="val")
    with pytest.raises(ValueError, match="JSON object"):
        score("coco_retrieval", task_world, preds["image_to_text"], split="val")


def test_two_gloo_processes_evaluate_like_one(retrieval_run, task_world, tmp_path):
    summary, out = retrieval_run
    one = evaluate("coco_retrieval", task_world, out / "model.safetensors", tmp_path / "one", split="val",
                   progress=False, overrides={"task.eval_batch_size": 3, "parallel.threads": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "imglish.cli.main", "evaluate", "coco_retrieval", "--data", str(task_world),
           "--checkpoint", str(out / "model.safetensors"), "--out", str(tmp_path / "two"),
           "--parallel.backend", "gloo", "--parallel.device", "cpu", "--parallel.threads", "1",
           "--task.eval_batch_size", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["metrics"] == pytest.approx(one.metrics, abs=1e-6)
    assert one.metrics == pytest.approx(summary.metrics, abs=1e-6)
    assert two["skipped"] == 0


def test_tied_similarities_score_like_the_metric():
    """Duplicated embeddings tie exactly; the rankings list wrong candidates first, as retrieval_recall counts."""
    from imglish.evaluation.metrics import retrieval_recall
    from imglish.tasks.retrieval import RetrievalTask

    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    img = base[[0, 1, 1, 2, 3, 3]]  # images 1/2 and 4/5 are identical
    image_ids = [10, 11, 12, 13, 14, 15]
    txt_rows = [0, 0, 1, 2, 2, 3, 4, 5, 5, 1]
    txt = torch.stack([img[r] + 0.0 for r in txt_rows])
    txt[1] = txt[0]  # and two captions are identical too
    records = {
        "images": [{"index": i, "image_id": iid, "embedding": img[i]} for i, iid in enumerate(image_ids)],
        "texts": [{"index": j, "image_id": image_ids[r], "text_id": f"{image_ids[r]}#{j}", "embedding": txt[j]}
                  for j, r in enumerate(txt_rows)],
    }
    task = RetrievalTask.__new__(RetrievalTask)
    task.name = "coco_retrieval"
    preds, metrics = task.evaluate_records(records, "val", None)
    expected = retrieval_recall(img @ txt.t(), torch.tensor(txt_rows), (1, 5, 10))
    assert metrics == expected
    assert metrics["tr_r1"] < 100 and metrics["ir_r1"] < 100  # the ties cost recall
    gt: dict[int, list[str]] = {}
    for t in records["texts"]:
        gt.setdefault(t["image_id"], []).append(t["text_id"])
    assert task.score(preds, gt) == pytest.approx(expected, abs=1e-12)
    # fewer candidates than 10: every ranking lists all of them
    assert all(len(r["image_ids"]) == 6 for r in preds["text_to_image"])


def _counts(task, split: str):
    from imglish.data import BadRecordCounter

    sets = task.eval_sets(split, BadRecordCounter())
    per_image = sorted(len(v) for v in task.ground_truth(split, BadRecordCounter()).values())
    return len(task.dataset(split, BadRecordCounter())), len(sets["images"]), len(sets["texts"]), per_image


@pytest.mark.parametrize("name", ["coco_retrieval", "flickr30k"])
def test_official_index_files_read_like_karpathy(name, task_world, task_tokenizer, tmp_path):
    from imglish.data.official import write_official_index
    from imglish.tasks import get_task
    from imglish.tokenizers.text import TextTokenizer

    tok = TextTokenizer(str(task_tokenizer))
    cfg = build_config("tiny", None, tiny_overrides(task_world, tmp_path, task_tokenizer), task=name)
    karpathy = get_task(name)(cfg, task_world, tok)
    fmt = "coco" if name == "coco_retrieval" else "flickr30k"
    data = json.loads((task_world / fmt / f"dataset_{fmt}.json").read_text())
    n_train = sum(len(e["sentences"]) for e in data["images"] if e["split"] in ("train", "restval"))
    assert len(karpathy.dataset("train", None)) == n_train
    write_official_index(task_world, tmp_path / "official", name, tok)
    official = get_task(name)(cfg, tmp_path / "official", tok)
    assert official._official("train") is not None and karpathy._official("train") is None
    for split in ("train", "val"):
        assert _counts(official, split) == _counts(karpathy, split), split
    # both give usable samples: the same image and caption ids
    k_rec, o_rec = karpathy.dataset("val", None)[0], official.dataset("val", None)[0]
    k, o = karpathy.sample(k_rec, 0, train=True), official.sample(o_rec, 0, train=True)
    assert k["image"].shape == (3, 64, 64) and torch.equal(k["image"], o["image"])
    assert torch.equal(k["language_tokens"], o["language_tokens"])
    sets = official.eval_sets("val", None)
    img = official.sample(sets["images"][0], None, train=False)
    txt = official.sample(sets["texts"][0], None, train=False)
    assert set(img) == {"image", "image_id"} and img["image_id"] == 0
    assert set(txt) == {"language_tokens", "padding_mask", "image_id", "text_id"} and txt["text_id"] == "0#0"
