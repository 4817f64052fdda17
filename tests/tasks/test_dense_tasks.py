"""ade20k and coco_detection: tiny fine-tunes on the world learn (mIoU well above the best constant prediction, box
AP well above zero), scoring a predictions file gives the evaluation's figures, samples are seeded and consistent,
and `imglish predict segment|detect` answer with overlays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imglish.data.synthetic import WorldConfig, generate_world
from imglish.training.config import build_config
from imglish.training.evaluate import score
from imglish.training.finetune import finetune
from tests.tasks.conftest import tiny_overrides

pytest.importorskip("pycocotools")


@pytest.fixture(scope="module")
def dense_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_world") / "w"
    generate_world(WorldConfig(num_images=240, seed=9, workers=1, formats=("ade20k", "coco_instances")), root)
    return root


def _run(world, out, task):
    return finetune(build_config("tiny", None, tiny_overrides(world, out), task=task)), out


def _best_constant_miou(world) -> float:
    """mIoU of predicting one class everywhere, for the best class: IoU = its pixel share, 0 for the others."""
    counts = np.zeros(6)
    for path in sorted((world / "ade20k" / "annotations" / "validation").glob("*.png")):
        raw = np.asarray(Image.open(path)).astype(np.int64)
        counts += np.bincount(raw[raw > 0] - 1, minlength=6)[:6]
    present = counts > 0
    return 100.0 * (counts / counts.sum()).max() / present.sum()


def test_segmentation_end_to_end(dense_world, tmp_path, capsys):
    """One tiny run (the fine-tunes are the slow part: each is made once, whatever the xdist split) checked for
    learning, for the score of its predictions file and for `imglish predict segment`."""
    from imglish.cli.main import main

    summary, out = _run(dense_world, tmp_path / "run", "ade20k")
    base = _best_constant_miou(dense_world)
    assert summary.metrics["mIoU"] > base + 8, (summary.metrics, base)  # measured: 28-29 against 14
    assert summary.metrics["aAcc"] > 80
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["task"] == "ade20k" and {"mIoU", "aAcc", "mAcc"} <= set(doc["metrics"])
    assert json.loads((out / "task.json").read_text())["state"]["classes"][0] == "background"

    preds = json.loads((out / "predictions.json").read_text())
    doc = score("ade20k", dense_world, out / "predictions.json", split="val")
    assert doc["metrics"] == pytest.approx(summary.metrics)
    with pytest.raises(ValueError, match="have no prediction"):
        score("ade20k", dense_world, {**preds, "images": preds["images"][1:]}, split="val")
    bad = {**preds, "images": [{**preds["images"][0], "id": "nope"}] + preds["images"][1:]}
    with pytest.raises(ValueError, match="unknown image"):
        score("ade20k", dense_world, bad, split="val")

    image = sorted((dense_world / "ade20k" / "images" / "validation").glob("*.jpg"))[0]
    overlay = tmp_path / "seg.png"
    assert main(["predict", "segment", "--checkpoint", str(out / "model.safetensors"), str(image),
                 "--out", str(overlay), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["result"]["size"] == [64, 64]
    names = {"background", "circle", "square", "triangle", "diamond", "cross"}
    assert {s["label"] for s in row["result"]["segments"]} <= names
    assert abs(sum(s["fraction"] for s in row["result"]["segments"]) - 1) < 1e-6
    assert Image.open(overlay).size == Image.open(image).size
    # the pipeline's label map is the evaluation's prediction: its confusion entries for this image agree
    import imglish
    from imglish.evaluation.dense import confusion_matrix

    pipe = imglish.pipeline("segment", out / "model.safetensors")
    label = torch.as_tensor(np.asarray(Image.open(dense_world / "ade20k" / "annotations" / "validation"
                                                  / f"{image.stem}.png")).astype(np.int64) - 1)
    label[label < 0] = 255
    m = confusion_matrix(pipe(str(image))["label_map"], label, 6)
    entry = next(p for p in preds["images"] if p["id"] == image.stem)
    assert sorted([g, p, int(m[g, p])] for g, p in m.nonzero().tolist()) == sorted(entry["confusion"])
    # `imglish evaluate` on a copy whose first val label map has the wrong size: that image is skipped and
    # counted, the rest is scored
    import shutil

    bad_world = tmp_path / "bad_world"
    shutil.copytree(dense_world / "ade20k", bad_world / "ade20k")
    victim = sorted((bad_world / "ade20k" / "annotations" / "validation").glob("*.png"))[0]
    label = Image.open(victim)
    victim.unlink()  # (a hard link into the shared world: write a new file)
    label.resize((32, 32), Image.NEAREST).save(victim)
    assert main(["evaluate", "ade20k", "--data", str(bad_world), "--checkpoint", str(out / "model.safetensors"),
                 "--out", str(tmp_path / "eval")]) == 0
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert doc["skipped"] == 1 and doc["bad_records"] == {"label size mismatch": 1}
    assert len(json.loads((tmp_path / "eval" / "predictions.json").read_text())["images"]) == 23
    capsys.readouterr()
    # bf16 weights: the same map up to a few boundary pixels
    bf16 = imglish.pipeline("segment", out / "model.safetensors", precision="bf16")(str(image))["label_map"]
    assert (bf16 == pipe(str(image))["label_map"]).float().mean() > 0.97


def test_detection_end_to_end(dense_world, tmp_path, capsys):
    from imglish.cli.main import main

    summary, out = _run(dense_world, tmp_path / "run", "coco_detection")
    m = summary.metrics
    assert m["bbox_AP50"] > 8 and m["bbox_AP"] > 3, m  # measured: 18.3 and 9.0 (an untrained model: 0.0)
    assert m["segm_AP50"] > 8, m
    assert set(json.loads((out / "metrics.json").read_text())["metrics"]) >= {"bbox_AP", "bbox_AP50", "segm_AP"}

    preds = json.loads((out / "predictions.json").read_text())
    doc = score("coco_detection", dense_world, out / "predictions.json", split="val")
    assert doc["metrics"] == pytest.approx(summary.metrics)
    with pytest.raises(ValueError, match="not evaluated"):
        score("coco_detection", dense_world, {**preds, "image_ids": preds["image_ids"][1:]}, split="val")
    # a plain COCO results list (anybody's detector) is scored against every image
    assert score("coco_detection", dense_world, preds["results"], split="val")["metrics"] == pytest.approx(m)

    images = sorted((dense_world / "ade20k" / "images" / "validation").glob("*.jpg"))[:2]
    folder = tmp_path / "det"
    assert main(["predict", "detect", "--checkpoint", str(out / "model.safetensors"), *map(str, images),
                 "--out", str(folder), "--threshold", "0.3", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all(isinstance(r["result"], list) for r in rows)
    for r in rows:
        for d in r["result"]:
            assert d["score"] >= 0.3 and d["label"] in {"circle", "square", "triangle", "diamond", "cross"}
            assert 0 <= d["box"]["xmin"] <= d["box"]["xmax"] <= 64
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{p.stem}.png" for p in images)
    assert main(["predict", "detect", "--checkpoint", str(out / "model.safetensors"), str(images[0]),
                 "--threshold", "2"]) == 2
    # `imglish evaluate` with a degenerate box in the val annotations: dropped and counted, the split scored
    import shutil

    bad_world = tmp_path / "bad_world"
    shutil.copytree(dense_world / "coco", bad_world / "coco")
    ann = bad_world / "coco" / "annotations" / "instances_val.json"
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["bbox"][2] = 0.0
    ann.unlink()
    ann.write_text(json.dumps(doc))
    assert main(["evaluate", "coco_detection", "--data", str(bad_world), "--checkpoint",
                 str(out / "model.safetensors"), "--out", str(tmp_path / "eval")]) == 0
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert doc["bad_records"] == {"bad box": 1} and doc["metrics"]["bbox_AP50"] >= 0
    assert len(json.loads((tmp_path / "eval" / "predictions.json").read_text())["image_ids"]) == 24

    import imglish

    with pytest.raises(ValueError, match="fp32"):
        imglish.pipeline("detect", out / "model.safetensors", precision="bf16")


def test_segmentation_samples_are_seeded_and_padded_with_ignore(dense_world, tmp_path):
    from imglish.tasks import get_task

    cfg = build_config("tiny", None, tiny_overrides(dense_world, tmp_path, **{"task.scale_range": (0.5, 0.5)}),
                       task="ade20k")
    task = get_task("ade20k")(cfg, dense_world)
    rec = task.dataset("train", None)[0]
    a, b = task.sample(rec, 3, train=True), task.sample(rec, 3, train=True)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["image"].shape == (3, 64, 64) and a["label"].shape == (64, 64)
    # at scale 0.5 the 64-pixel scene becomes 32 pixels: the rest of the crop is padding, labelled 255
    valid = a["label"] != 255
    assert int(valid[32:].sum()) == 0 and 900 < int(valid.sum()) <= 32 * 32  # (clutter specks are ignored too)
    ev = task.sample(rec, None, train=False)
    assert ev["label"].shape == tuple(np.asarray(rec["label"]).shape)


def test_detection_samples_keep_boxes_on_their_masks(dense_world, tmp_path):
    from imglish.tasks import get_task

    cfg = build_config("tiny", None, tiny_overrides(dense_world, tmp_path, **{"task.scale_range": (0.5, 1.5)}),
                       task="coco_detection")
    task = get_task("coco_detection")(cfg, dense_world)
    ds = task.dataset("train", None)
    for k in range(4):
        s = task.sample(ds[k], 11 + k, train=True)
        t = s["target"]
        assert s["image"].shape == (3, 128, 128)
        assert t["masks"].shape[0] == t["boxes"].shape[0] == t["labels"].shape[0]
        for box, mask in zip(t["boxes"], t["masks"]):
            ys, xs = mask.nonzero(as_tuple=True)
            assert abs(float(xs.min()) - float(box[0])) <= 2.5 and abs(float(xs.max()) + 1 - float(box[2])) <= 2.5
            assert abs(float(ys.min()) - float(box[1])) <= 2.5 and abs(float(ys.max()) + 1 - float(box[3])) <= 2.5


