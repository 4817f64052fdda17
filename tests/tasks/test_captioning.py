"""coco_captioning and nocaps: the tiny preset learns to caption the image from random weights (above the most
frequent training caption, and above its own captions given to other images); a short fine-tune writes
COCO-format captions and metrics, with periodic evaluations in its history; scoring is the evaluation's; the
official loss (label smoothing, drop-worst) and masking; NoCaps folders; official index files."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from imglish.data import BadRecordCounter
from imglish.data.masking import caption_mask_count
from imglish.evaluation.captions import caption_backend, caption_scores
from imglish.tasks import STREAM, get_task
from imglish.tasks.captioning import caption_token_losses, kept_token_count
from imglish.tokenizers.text import TextTokenizer
from imglish.training.config import build_config
from imglish.training.evaluate import evaluate, score
from imglish.training.finetune import finetune
from tests.tasks.conftest import tiny_overrides

PY = {"task.caption_backend": "python"}
DECODE = {**PY, "task.max_gen_len": 24, "task.num_beams": 2}  # the run's decoding, for every evaluation of its model


def coco_available() -> bool:
    try:
        return caption_backend("coco") == "coco"
    except RuntimeError:
        return False


def _task(name, world, out, tokenizer=None, **extra):
    cfg = build_config("tiny", None, tiny_overrides(world, out, tokenizer, **{**PY, **extra}), task=name)
    tok = TextTokenizer(tokenizer) if tokenizer is not None else None
    return get_task(name)(cfg, world, tok), cfg


@pytest.fixture(scope="module")
def caption_run(task_world, task_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("caption_run")
    cfg = build_config("tiny", None, tiny_overrides(task_world, out, task_tokenizer, **{
        **DECODE, "task.eval_every": 10, "schedule.max_steps": 20}),
        task="coco_captioning")
    return finetune(cfg), out


def _val_references(world):
    from imglish.data.coco import load_caption_gt

    return {k: v for k, v in load_caption_gt(world / "coco/annotations/coco_karpathy_val_gt.json").items() if v}


def _cider(captions, refs):
    return caption_scores(captions, refs, "python", metrics=("CIDEr",))["CIDEr"]


def test_tiny_preset_captions_the_image(task_world, task_tokenizer, tmp_path):
    """The tiny preset as it is (600 steps, patch 16, half the caption masked; measured CIDEr 71.5): its captions
    beat the most frequent training caption written for every image (43.5), and the same captions moved to other
    images (39-51): they describe their own image, not only the world's templates."""
    from imglish.data.coco import load_caption_gt

    out = tmp_path / "run"
    summary = finetune(build_config("tiny", None, tiny_overrides(task_world, out, task_tokenizer, **PY),
                                    task="coco_captioning"))
    refs = _val_references(task_world)
    preds = {p["image_id"]: p["caption"] for p in json.loads((out / "predictions.json").read_text())}
    cider = summary.metrics["CIDEr"]
    assert cider == pytest.approx(_cider(preds, refs))
    train = load_caption_gt(task_world / "coco/annotations/coco_karpathy_train_gt.json")
    frequent = Counter(c for caps in train.values() for c in caps).most_common(1)[0][0]
    assert cider > _cider({k: frequent for k in refs}, refs) + 10, (summary.metrics, frequent)
    ids = sorted(refs)
    for shift in (1, 7, 19):  # every image gets the caption written for another one
        moved = {k: preds[ids[(i + shift) % len(ids)]] for i, k in enumerate(ids)}
        assert cider > _cider(moved, refs) + 10, (summary.metrics, shift)


def test_captioning_run_writes_captions_and_metrics(caption_run, task_world):
    summary, out = caption_run
    refs = _val_references(task_world)
    m = summary.metrics
    assert m["backend"] == "python"
    assert {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"} <= set(m) and "METEOR" not in m
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["task"] == "coco_captioning" and doc["split"] == "val" and doc["metrics"]["backend"] == "python"
    preds = json.loads((out / "predictions.json").read_text())
    assert sorted(p["image_id"] for p in preds) == sorted(refs)
    assert all(set(p) == {"image_id", "caption"} and isinstance(p["caption"], str) for p in preds)
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert any("eval/CIDEr" in r and "eval/backend" not in r for r in rows)  # periodic evaluation logged numbers
    for name in ("model.safetensors", "processor.json", "task.json"):
        assert (out / name).is_file(), name


def test_score_of_the_file_equals_the_final_metrics(caption_run, task_world):
    summary, out = caption_run
    doc = score("coco_captioning", task_world, out / "predictions.json", split="val", overrides=PY)
    assert doc["metrics"] == pytest.approx(summary.metrics)
    preds = json.loads((out / "predictions.json").read_text())
    with pytest.raises(ValueError, match="no prediction"):
        score("coco_captioning", task_world, preds[1:], split="val", overrides=PY)
    with pytest.raises(ValueError, match="unknown image_id"):
        score("coco_captioning", task_world, [dict(preds[0], image_id=-5)] + preds[1:], split="val", overrides=PY)
    with pytest.raises(ValueError, match="more than once"):
        score("coco_captioning", task_world, preds + preds[:1], split="val", overrides=PY)
    with pytest.raises(ValueError, match="caption must be a string"):
        score("coco_captioning", task_world, [dict(preds[0], caption=3)] + preds[1:], split="val", overrides=PY)


@pytest.mark.skipif(not coco_available(), reason="the coco backend needs `java` and pycocoevalcap")
def test_coco_backend_scores_with_meteor(caption_run, task_world):
    summary, out = caption_run
    doc = score("coco_captioning", task_world, out / "predictions.json", split="val",
                overrides={"task.caption_backend": "coco"})
    m = doc["metrics"]
    assert m["backend"] == "coco" and "METEOR" in m
    assert m["CIDEr"] == pytest.approx(summary.metrics["CIDEr"], abs=1.0)  # python backend: to within rounding


# ------------------------------------------------------------------------------------------------- loss, masking
def _train_batch(task, n=6, seed=3):
    ds = task.dataset("train", BadRecordCounter())
    samples = [task.sample(ds[i], seed + i, train=True) for i in range(n)]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def _official_loss(logits, target, eps, drop_ratio=0.0):
    """BertCaptioningLoss as the official code writes it (one-hot target, KLDivLoss summed over classes)."""
    n_class = logits.size(1)
    one_hot = torch.zeros_like(logits).scatter(1, target.view(-1, 1), 1)
    one_hot = one_hot * (1 - eps) + (1 - one_hot) * eps / (n_class - 1)
    loss = torch.nn.KLDivLoss(reduction="none")(F.log_softmax(logits, dim=1), one_hot).sum(1)
    if drop_ratio > 0:
        loss, _ = torch.topk(loss, k=int(loss.shape[0] * (1 - drop_ratio)), largest=False)
    return loss.mean()


def test_loss_and_counts_follow_bert_captioning_loss(task_world, task_tokenizer, tmp_path):
    from imglish.training.finetune import build_task_model

    task, cfg = _task("coco_captioning", task_world, tmp_path, task_tokenizer,
                      **{"task.drop_worst_after": 10, "task.drop_worst_ratio": 0.2, "task.label_smoothing": 0.1})
    model = build_task_model(cfg, task, task.tokenizer.vocab_size).eval()
    part = _train_batch(task)
    n = int(part["language_masked_pos"].sum())
    assert task.count_targets({STREAM: part}, 0) == {"caption": n}
    assert task.count_targets({STREAM: part}, 10) == {"caption": n}  # official: iter > drop_worst_after
    assert task.count_targets({STREAM: part}, 11) == {"caption": int(n * 0.8)}
    pos = part["language_masked_pos"].bool()
    with torch.no_grad():
        logits, _ = model(part["image"], part["text_ids"], part["padding_mask"], pos)
        target = part["masked_tokens"][pos]
        for step, ratio in ((0, 0.0), (11, 0.2)):
            (loss_sum, correct), = task.loss_terms(model, part, step).values()
            count = task.count_targets({STREAM: part}, step)["caption"]
            expected = _official_loss(logits.float(), target, 0.1, ratio)
            assert float(loss_sum) / count == pytest.approx(float(expected), rel=1e-5)
            assert 0 <= int(correct) <= count
            out = task.step_module(model)({STREAM: part}, None, step)  # what the trainer back-propagates
            assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)
    # the closed form equals the one-hot KL for each token, smoothing or not
    logits = torch.randn(7, 11)
    target = torch.randint(0, 11, (7,))
    for eps in (0.0, 0.1, 0.3):
        assert caption_token_losses(logits, target, eps).mean() == pytest.approx(
            float(_official_loss(logits, target, eps)) if eps else float(F.cross_entropy(logits, target)), rel=1e-5)
    assert kept_token_count(10, 5, 0.2, 4) == 8 and kept_token_count(10, 4, 0.2, 4) == 10
    assert kept_token_count(10, 100, 0.0, 4) == 10


@pytest.mark.parametrize("prob", [0.7, 0.3])
def test_training_sample_masks_as_officially(task_world, task_tokenizer, tmp_path, prob):
    task, _ = _task("coco_captioning", task_world, tmp_path, task_tokenizer, **{"task.mask_prob": prob})
    ds = task.dataset("train", BadRecordCounter())
    tok = task.tokenizer
    for i in range(8):
        rec = ds[i]
        s = task.sample(rec, 100 + i, train=True)
        ids, pad = task.text(rec)
        T = task.cfg.data.max_text_len
        for key in ("text_ids", "padding_mask", "language_masked_pos", "masked_tokens"):
            assert s[key].shape == (T,) and s[key].dtype == torch.long, key
        assert torch.equal(s["padding_mask"], pad)
        pos = s["language_masked_pos"].bool()
        num_tokens = int((pad == 0).sum())
        assert int(pos.sum()) == caption_mask_count(num_tokens, prob)
        assert not pos[0] and not pos[num_tokens:].any()  # never BOS, never padding
        assert torch.equal(s["masked_tokens"][pos], ids[pos]) and not s["masked_tokens"][~pos].any()
        assert torch.equal(s["text_ids"][~pos], ids[~pos])
        assert int((s["text_ids"][pos] == tok.mask_token_id).sum()) >= 1 or int(pos.sum()) < 3
        again = task.sample(rec, 100 + i, train=True)
        assert all(torch.equal(s[k], again[k]) for k in s)  # seeded by the sample's seed
    other = [task.sample(ds[i], 7 + i, train=True)["language_masked_pos"] for i in range(8)]
    first = [task.sample(ds[i], 100 + i, train=True)["language_masked_pos"] for i in range(8)]
    assert any(not torch.equal(a, b) for a, b in zip(first, other))
    ev = task.sample(ds[0], None, train=False)
    assert set(ev) == {"image", "image_id"}


# ------------------------------------------------------------------------------------------------- nocaps
def _nocaps_folder(world, root, offset=10_000):
    """A NoCaps-layout folder from the world's val images and captions (new ids and file names), with the world's
    COCO folder for training."""
    data = json.loads((world / "coco/dataset_coco.json").read_text())
    (root / "nocaps" / "val").mkdir(parents=True)
    (root / "nocaps" / "test").mkdir(parents=True)
    images, anns, test_images = [], [], []
    for im in data["images"]:
        if im["split"] not in ("val", "test"):
            continue
        new_id, name = im["cocoid"] + offset, f"nc_{im['cocoid']:06d}.jpg"
        shutil.copy(world / "coco" / im["filepath"] / im["filename"], root / "nocaps" / im["split"] / name)
        if im["split"] == "test":
            test_images.append({"id": new_id, "file_name": name})
            continue
        images.append({"id": new_id, "file_name": name})
        anns += [{"image_id": new_id, "id": len(anns), "caption": s["raw"]} for s in im["sentences"]]
    (root / "nocaps" / "nocaps_val_4500_captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    (root / "nocaps" / "nocaps_test_image_info.json").write_text(json.dumps({"images": test_images}))
    (root / "coco").symlink_to(world / "coco", target_is_directory=True)
    return root


def test_nocaps_evaluates_on_a_nocaps_folder(caption_run, task_world, tmp_path):
    summary, out = caption_run
    root = _nocaps_folder(task_world, tmp_path / "nc")
    task, _ = _task("nocaps", root, tmp_path / "o")
    assert len(task.dataset("train", BadRecordCounter())) == len(
        get_task("coco_captioning")(task.cfg, task_world).dataset("train", BadRecordCounter()))
    res = evaluate("nocaps", root, out / "model.safetensors", tmp_path / "ev", split="val", overrides=DECODE,
                   progress=False)
    # the same images and references under NoCaps ids: the same captions, so the COCO val metrics
    assert res.metrics == pytest.approx(summary.metrics)
    preds = json.loads((tmp_path / "ev" / "predictions.json").read_text())
    assert min(p["image_id"] for p in preds) > 10_000
    assert score("nocaps", root, preds, split="val", overrides=PY)["metrics"] == pytest.approx(res.metrics)
    # test: no public captions; the predictions are written, scoring says why it cannot
    res = evaluate("nocaps", root, out / "model.safetensors", tmp_path / "et", split="test", overrides=DECODE,
                   progress=False)
    assert res.metrics == {} and len(json.loads((tmp_path / "et" / "predictions.json").read_text())) == 40
    with pytest.raises(ValueError, match="no public reference captions"):
        score("nocaps", root, tmp_path / "et" / "predictions.json", split="test", overrides=PY)
    with pytest.raises(FileNotFoundError, match="nocaps_val_4500_captions.json"):
        _task("nocaps", task_world, tmp_path / "o2")[0].dataset("val", BadRecordCounter())


# ------------------------------------------------------------------------------------------------- official index
def test_official_index_files_read_back(task_world, task_tokenizer, tmp_path):
    from imglish.data.official import write_official_index

    idx = tmp_path / "official"
    write_official_index(task_world, idx, "coco_captioning", TextTokenizer(task_tokenizer))
    official, _ = _task("coco_captioning", idx, tmp_path / "o", task_tokenizer)
    karpathy, _ = _task("coco_captioning", task_world, tmp_path / "o", task_tokenizer)
    skip = BadRecordCounter()
    for split in ("train", "val", "test"):
        a, b = official.dataset(split, skip), karpathy.dataset(split, skip)
        assert type(a).__name__ == "OfficialIndexDataset" and len(a) == len(b), split
        assert len(official.eval_sets(split, skip)["records"]) == len(karpathy.eval_sets(split, skip)["records"])
    a, b = official.dataset("train", skip), karpathy.dataset("train", skip)
    for i in (0, 7):
        sa, sb = official.sample(a[i], 5, train=True), karpathy.sample(b[i], 5, train=True)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), i  # same ids, same masks, same image
    assert official.sample(official.dataset("val", skip)[0], None, train=False)["image_id"] == \
        karpathy.sample(karpathy.dataset("val", skip)[0], None, train=False)["image_id"]
    with pytest.raises(FileNotFoundError, match="coco_karpathy_val_gt.json"):
        official.ground_truth("val", skip)
    shutil.copy(task_world / "coco/annotations/coco_karpathy_val_gt.json", idx)
    assert official.ground_truth("val", skip) == karpathy.ground_truth("val", skip)
    assert skip.total == 0
