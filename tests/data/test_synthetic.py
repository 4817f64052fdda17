"""The synthetic world: determinism, splits, real clients, and labels/captions that depend on the pixels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from imglish.cli.main import main
from imglish.data.coco import KarpathyCaptions
from imglish.data.imagenet import ImageFolderDataset
from imglish.data.synthetic import (
    _COLORS,
    WorldConfig,
    class_names,
    generate_world,
    load_world,
    world_paths,
)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_whatever_the_worker_count(tmp_path):
    cfg = dict(num_images=40, seed=11, shard_size=8)
    generate_world(WorldConfig(**cfg, workers=1), tmp_path / "a")
    generate_world(WorldConfig(**cfg, workers=2), tmp_path / "b")
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert len(da) > 100
    assert da == db


def test_another_seed_gives_another_world(tmp_path):
    generate_world(WorldConfig(num_images=20, seed=1, formats=("coco",), workers=1), tmp_path / "a")
    generate_world(WorldConfig(num_images=20, seed=2, formats=("coco",), workers=1), tmp_path / "b")
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a.keys() == b.keys()
    differing = [k for k in a if a[k] != b[k]]
    assert len(differing) > 0.9 * len(a)


def test_splits_have_the_requested_sizes_and_disjoint_images(world):
    info = load_world(world)
    sizes = {s: r["stop_id"] - r["first_id"] for s, r in info["splits"].items()}
    assert sizes == {"train": 48, "val": 6, "test": 6}
    p = world_paths(world)
    ids = {s: {r["image_id"] for r in KarpathyCaptions(p["coco_karpathy"], splits=[s], per="image").images}
           for s in sizes}
    assert {s: len(v) for s, v in ids.items()} == sizes
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    trees = {s: {f.name for f in (p[f"imagenet_{s}"]).rglob("*.JPEG")} for s in sizes}
    assert sum(len(v) for v in trees.values()) == 60
    assert not (trees["train"] & trees["val"]) and not (trees["train"] & trees["test"])


def test_image_size_224_works(tmp_path):
    generate_world(WorldConfig(num_images=3, image_size=224, formats=("imagenet",), workers=1), tmp_path / "w")
    files = sorted((tmp_path / "w" / "imagenet").rglob("*.JPEG"))
    assert len(files) == 3
    assert Image.open(files[0]).size == (224, 224)


def test_class_label_is_readable_from_the_pixels(world):
    """The colour of the largest object (half of the label) is recovered by a trivial pixel rule far above chance."""
    ds = ImageFolderDataset(world_paths(world)["imagenet_train"])
    names = {n: np.array(c, dtype=float) for n, c in _COLORS.items()}
    hits, labels = 0, []
    for i in range(len(ds)):
        rec = ds[i]
        arr = np.asarray(rec["image"], dtype=float).reshape(-1, 3)
        sat = arr[(arr.max(1) - arr.min(1)) > 80]  # coloured pixels only (backgrounds are grey/beige)
        dist = ((sat[:, None, :] - np.stack(list(names.values()))[None]) ** 2).sum(-1)
        votes = np.bincount(dist.argmin(1), minlength=len(names))
        guess = list(names)[int(votes.argmax())]
        label_color = ds.classes[rec["label"]].split("_")[0]
        hits += guess == label_color
        labels.append(label_color)
    majority = max(labels.count(c) for c in set(labels)) / len(labels)
    assert hits / len(ds) > 0.8 > majority + 0.3


def test_captions_name_the_largest_object(world):
    p = world_paths(world)
    caps = KarpathyCaptions(p["coco_karpathy"], splits=["train"], per="image")
    tree = ImageFolderDataset(p["imagenet_train"])
    label_of = {int(Path(f).stem): tree.classes[lab] for f, lab in tree.samples}
    for entry in caps.images:
        color, shape = label_of[entry["image_id"]].split("_")
        assert sum(color in c and shape in c for c in entry["captions"]) >= 2, entry["captions"]
        assert len(set(entry["captions"])) >= 4


def test_vqa_files_have_ten_answers_and_some_disagreement(world):
    vq = world_paths(world)["vqav2_dir"]
    anns = json.loads((vq / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    qs = json.loads((vq / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())["questions"]
    assert len(anns) == len(qs) == 48 * 4
    assert all(len(a["answers"]) == 10 for a in anns)
    disagree = sum(len({x["answer"] for x in a["answers"]}) > 1 for a in anns)
    assert 0.2 * len(anns) < disagree < 0.95 * len(anns)
    assert {a["answer_type"] for a in anns} == {"yes/no", "number", "other"}


def test_nlvr2_has_both_labels_and_its_images(world):
    lines = [json.loads(x) for x in (world_paths(world)["nlvr2_dir"] / "train.json").read_text().splitlines()]
    assert len(lines) == 48 * 4  # 4 pairs per training image by default
    labels = [x["label"] for x in lines]
    assert 0.2 < labels.count("True") / len(labels) < 0.8


def test_pycocotools_loads_the_caption_ground_truth(world):
    from pycocotools.coco import COCO

    gt_path = world_paths(world)["coco_gt_test"]
    coco = COCO(str(gt_path))
    assert len(coco.getImgIds()) == 6
    assert len(coco.getAnnIds()) == 30
    img = coco.getImgIds()[0]
    results = [{"image_id": i, "caption": coco.imgToAnns[i][0]["caption"]} for i in coco.getImgIds()]
    res = coco.loadRes(results)
    assert res.imgToAnns[img][0]["caption"] == coco.imgToAnns[img][0]["caption"]


def test_webdataset_library_iterates_the_shards(world):
    shards = sorted(str(p) for p in world_paths(world)["wds_dir"].glob("pairs-train-*.tar"))
    assert len(shards) == 3  # 48 samples, 16 per shard
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("pil"))
    assert len(samples) == 48
    assert samples[0]["jpg"].size == (64, 64)
    assert isinstance(samples[0]["txt"], str) and samples[0]["txt"]
    assert samples[0]["json"]["captions"][0] == samples[0]["txt"]


def test_torchvision_imagefolder_reads_the_class_tree(world):
    from torchvision.datasets import ImageFolder

    root = world_paths(world)["imagenet_train"]
    tv = ImageFolder(str(root), allow_empty=True)
    ours = ImageFolderDataset(root)
    assert tv.classes == ours.classes == class_names()
    assert [(Path(p), lab) for p, lab in tv.samples] == ours.samples


def test_cli_shapes_writes_a_world_and_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["data", "shapes", "--out", str(out), "--num-images", "12", "--seed", "5", "--quiet",
            "--formats", "coco,text", "--workers", "1"]
    assert main(args) == 0
    assert load_world(out)["config"]["num_images"] == 12
    assert (out / "text" / "train.txt").is_file() and not (out / "nlvr2").exists()
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="image_size"):
        WorldConfig(image_size=8).validate()
    with pytest.raises(ValueError, match="unknown formats"):
        WorldConfig(formats=("coco", "laion")).validate()
