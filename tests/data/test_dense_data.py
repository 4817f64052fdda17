"""Dense-prediction layouts of the synthetic world (ADE20K label maps, COCO instances) and their readers.

The label maps must match the pixels exactly, the COCO annotations must agree with them and load in
pycocotools, the images must not change when the new layouts are written, and bad records are skipped and
counted.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imglish.data import ADE20KDataset, CocoInstancesDataset
from imglish.data.skip import BadRecordCounter, BadRecordError, SkippedRecord
from imglish.data.synthetic import (
    _BACKGROUNDS,
    _S_SCENE,
    _SHAPES,
    ADE_CLASSES,
    WorldConfig,
    _rle_counts,
    _rng,
    generate_world,
    load_world,
    render_scene,
    sample_scene,
    world_paths,
)

mask_api = pytest.importorskip("pycocotools.mask")
COCO = pytest.importorskip("pycocotools.coco").COCO

# pycocotools 2.0.11 trips NumPy 2's __array__(copy=) DeprecationWarning inside its own decode
pytestmark = pytest.mark.filterwarnings("ignore:.*__array__ implementation:DeprecationWarning")

CFG = {"num_images": 30, "image_size": 64, "seed": 4, "workers": 1}
ADE_DIRS = {"train": "training", "val": "validation", "test": "testing"}


@pytest.fixture(scope="module")
def dense_world(tmp_path_factory):
    """30 images (24 / 3 / 3), only the two dense layouts."""
    root = tmp_path_factory.mktemp("dense") / "w"
    generate_world(WorldConfig(**CFG, formats=("ade20k", "coco_instances")), root)
    return root


def _coco(doc: dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = doc
        coco.createIndex()
    return coco


def _scene(image_id: int) -> dict:
    return sample_scene(_rng(CFG["seed"], _S_SCENE, image_id), WorldConfig(**CFG))


def _label_map(world: Path, split: str, image_id: int) -> np.ndarray:
    path = world / "ade20k" / "annotations" / ADE_DIRS[split] / f"ADE_{split}_{image_id:08d}.png"
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im).copy()


def _dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel (3x3 neighbourhood)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)


def _splits(world: Path) -> dict[str, range]:
    return {s: range(r["first_id"], r["stop_id"]) for s, r in load_world(world)["splits"].items()}


# ------------------------------------------------------------------------------------------------ writing


def test_rle_counts_are_pycocotools_uncompressed_rle():
    rng = np.random.default_rng(0)
    masks = [np.zeros((5, 7), bool), np.ones((5, 7), bool), rng.random((9, 6)) < 0.4]
    first_set = np.zeros((4, 4), bool)
    first_set[0, 0] = first_set[1:3, 2] = True
    for m in [*masks, first_set]:
        counts = _rle_counts(m)
        assert sum(counts) == m.size
        rle = mask_api.frPyObjects({"counts": counts, "size": list(m.shape)}, *m.shape)
        assert np.array_equal(mask_api.decode(rle).astype(bool), m)
    assert _rle_counts(first_set)[0] == 0  # a mask that starts with a set pixel opens with an empty zero run


def test_render_scene_labels_change_no_pixel_and_match_the_drawing():
    cfg = WorldConfig(**CFG)
    for k in range(1, 9):
        scene = _scene(k)
        plain = render_scene(scene, cfg, _rng(cfg.seed, _S_SCENE + 100, k))
        img, lab = render_scene(scene, cfg, _rng(cfg.seed, _S_SCENE + 100, k), labels=True)
        assert plain.tobytes() == img.tobytes()
        assert lab.dtype == np.uint8 and lab.shape == (64, 64)
    # without noise, on a plain background, exactly the labelled pixels differ from the background colour
    quiet = WorldConfig(**CFG, noise_fraction=0.0)
    checked = specks = 0
    for k in range(1, 60):
        scene = _scene(k)
        if scene["gradient"]:
            continue
        img, lab = render_scene(scene, quiet, _rng(quiet.seed, _S_SCENE + 100, k), labels=True)
        arr = np.asarray(img).astype(int)
        off_background = (arr != np.array(_BACKGROUNDS[scene["background"]])).any(-1)
        assert np.array_equal(off_background, lab != 1), k
        grey = arr[lab == 0]
        assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()  # specks are grey
        specks += int((lab == 0).any())
        checked += 1
    assert checked >= 15 and specks >= 5


def test_ade20k_layout_label_values_and_objects(dense_world):
    info = load_world(dense_world)
    ade = world_paths(dense_world)["ade20k_root"]
    assert json.loads((ade / "classes.json").read_text()) == list(ADE_CLASSES) == ["background", *_SHAPES]
    assert info["counts"]["ade20k"] == {"train": 24, "val": 3, "test": 3}
    seen_ignore = False
    for split, ids in _splits(dense_world).items():
        images = sorted(p.name for p in (ade / "images" / ADE_DIRS[split]).iterdir())
        labels = sorted(p.name for p in (ade / "annotations" / ADE_DIRS[split]).iterdir())
        assert images == [f"ADE_{split}_{i:08d}.jpg" for i in ids]
        assert labels == [n.replace(".jpg", ".png") for n in images]
        for i in ids:
            lab = _label_map(dense_world, split, i)
            with Image.open(ade / "images" / ADE_DIRS[split] / f"ADE_{split}_{i:08d}.jpg") as im:
                assert im.size == (lab.shape[1], lab.shape[0]) == (64, 64)
            assert set(np.unique(lab).tolist()) <= set(range(7))
            seen_ignore |= bool((lab == 0).any())
            for o in _scene(i)["objects"]:
                cx, cy = int(o["x"] * 64), int(o["y"] * 64)
                assert lab[cy, cx] == 2 + _SHAPES.index(o["shape"]), (i, o)
    assert seen_ignore  # the specks exercise the ignore label


def test_coco_instances_json_agrees_with_the_scenes_and_label_maps(dense_world):
    p = world_paths(dense_world)
    info = load_world(dense_world)
    poly_ious: list[tuple[float, float]] = []  # (IoU, radius in pixels)
    for split, ids in _splits(dense_world).items():
        doc = json.loads(p[f"coco_instances_{split}"].read_text())
        coco = _coco(doc)
        assert info["counts"]["coco_instances"][split] == len(doc["annotations"])
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(_SHAPES)
        assert sorted(coco.getImgIds()) == list(ids)
        assert [a["id"] for a in doc["annotations"]] == list(range(1, len(doc["annotations"]) + 1))
        for i in ids:
            img = coco.loadImgs(i)[0]
            assert (p["coco_root"] / img["file_name"]).is_file() and (img["width"], img["height"]) == (64, 64)
            objects = _scene(i)["objects"]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=i))
            assert [a["category_id"] for a in anns] == [_SHAPES.index(o["shape"]) + 1 for o in objects]
            assert all(a["iscrowd"] == 0 for a in anns)
            lab = _label_map(dense_world, split, i)
            masks = [coco.annToMask(a).astype(bool) for a in anns]
            for k, (a, o, m) in enumerate(zip(anns, objects, masks)):
                x, y, w, h = a["bbox"]
                # pycocotools leaves out the pixels of a sharp tip that its centre misses: up to 1.5 px
                ys, xs = np.nonzero(m)
                assert abs(xs.min() - x) <= 1.5 and abs(xs.max() + 1 - (x + w)) <= 1.5
                assert abs(ys.min() - y) <= 1.5 and abs(ys.max() + 1 - (y + h)) <= 1.5
                # this object's pixels in the label map: its class, near its box, away from the other objects
                others = np.zeros_like(m)
                for j, mj in enumerate(masks):
                    if j != k:
                        others |= mj
                others = _dilate(others)  # pycocotools and Pillow may differ by a pixel at a boundary
                near = np.zeros_like(m)
                near[max(int(y) - 1, 0) : int(y + h) + 2, max(int(x) - 1, 0) : int(x + w) + 2] = True
                drawn = (lab == a["category_id"] + 1) & near & ~others
                if not (m & others).any():  # the drawn pixels of an unoccluded object fill its box
                    # (Pillow truncates polygon vertices and rounds the box of an ellipse)
                    tol = 1.5 if o["shape"] == "circle" else 1.0
                    ys, xs = np.nonzero(drawn)
                    assert abs(xs.min() - x) <= tol and abs(xs.max() + 1 - (x + w)) <= tol
                    assert abs(ys.min() - y) <= tol and abs(ys.max() + 1 - (y + h)) <= tol
                if o["shape"] == "circle":
                    assert isinstance(a["segmentation"], dict) and a["segmentation"]["size"] == [64, 64]
                    assert np.array_equal(drawn, m & ~others), (i, k)
                    assert a["area"] == m.sum()
                    cx, cy, r = o["x"] * 64, o["y"] * 64, o["r"] * 64
                    assert a["bbox"] == [round(v, 2) for v in (cx - r, cy - r, 2 * r, 2 * r)]
                else:
                    poly = a["segmentation"]
                    assert isinstance(poly, list) and len(poly) == 1 and len(poly[0]) % 2 == 0
                    assert a["area"] == pytest.approx(m.sum(), rel=0.3)
                    region = m & ~others
                    poly_ious.append(((drawn & region).sum() / (drawn | region).sum(), o["r"] * 64))
            # every labelled shape pixel lies in the (1-pixel widened) box of an object of its class
            for cls in range(2, 7):
                allowed = np.zeros(lab.shape, bool)
                for a in anns:
                    if a["category_id"] + 1 == cls:
                        x, y, w, h = a["bbox"]
                        allowed[max(int(np.floor(y - 1)), 0) : int(np.ceil(y + h + 1)),
                                max(int(np.floor(x - 1)), 0) : int(np.ceil(x + w + 1))] = True
                assert not ((lab == cls) & ~allowed).any(), (i, cls)
    ious = np.array(poly_ious)
    assert len(ious) >= 20
    # Pillow draws polygons with their vertices truncated to whole pixels: the exact polygons of the JSON
    # agree with the drawn pixels well for the large objects and roughly for the small ones (a few pixels)
    large = ious[ious[:, 1] > 12, 0]
    assert len(large) >= 5 and large.mean() >= 0.88 and large.min() >= 0.75
    assert ious[:, 0].min() >= 0.5 and ious[:, 0].mean() >= 0.8


def test_images_are_the_same_with_and_without_the_dense_layouts(dense_world, tmp_path):
    generate_world(WorldConfig(**CFG, formats=("coco",)), tmp_path / "coco_only")
    generate_world(WorldConfig(**CFG, formats=("coco_instances",)), tmp_path / "inst_only")
    splits = _splits(dense_world)
    jpgs = sorted((tmp_path / "coco_only" / "coco").glob("*2014/*.jpg"))
    assert len(jpgs) == 30
    for path in jpgs:
        rel = path.relative_to(tmp_path / "coco_only")
        assert (dense_world / rel).read_bytes() == path.read_bytes()
        assert (tmp_path / "inst_only" / rel).read_bytes() == path.read_bytes()
        image_id = int(path.stem.rsplit("_", 1)[1])
        split = next(s for s, ids in splits.items() if image_id in ids)
        ade = dense_world / "ade20k" / "images" / ADE_DIRS[split] / f"ADE_{split}_{image_id:08d}.jpg"
        assert ade.read_bytes() == path.read_bytes()
    doc = json.loads(world_paths(tmp_path / "inst_only")["coco_instances_val"].read_text())
    assert all((tmp_path / "inst_only" / "coco" / im["file_name"]).is_file() for im in doc["images"])


# ------------------------------------------------------------------------------------------------ readers


def test_ade20k_reader_on_the_world(dense_world):
    root = world_paths(dense_world)["ade20k_root"]
    ds = ADE20KDataset(root, "training")
    assert len(ds) == 24 and ds.classes == list(ADE_CLASSES) and ds.skip.total == 0
    assert ds.ids == sorted(ds.ids) and ds.ids[0] == "ADE_train_00000001"
    assert len(ADE20KDataset(root, "val")) == 3 and ADE20KDataset(root, "test").split == "testing"
    raw_ds = ADE20KDataset(root, "train", reduce_zero_label=False)
    ignored = 0
    for i in range(len(ds)):
        rec, raw = ds[i], raw_ds[i]
        assert rec["image"].mode == "RGB" and rec["image"].size == (64, 64)
        assert rec["label"].dtype == np.uint8 and rec["label"].shape == (64, 64)
        assert rec["id"] == Path(rec["path"]).stem == ds.ids[i]
        r = raw["label"].astype(int)
        assert np.array_equal(rec["label"], np.where(r == 0, 255, r - 1))
        assert set(np.unique(rec["label"]).tolist()) <= {0, 1, 2, 3, 4, 5, 255}
        ignored += int((rec["label"] == 255).sum())
    assert ignored > 0  # the specks
    assert ADE20KDataset(root, "training", num_classes=6)[0]["label"].tolist() == ds[0]["label"].tolist()


def test_ade20k_reader_skips_and_counts_bad_records(dense_world, tmp_path):
    root = tmp_path / "ade"
    shutil.copytree(world_paths(dense_world)["ade20k_root"], root)
    imgs, labs = root / "images" / "training", root / "annotations" / "training"
    # 1: label map of another size; 2: a class id out of range; 3: no label map; 4: a corrupt image
    lab1 = labs / "ADE_train_00000001.png"
    Image.open(lab1).resize((32, 48), Image.NEAREST).save(lab1)
    lab2 = np.asarray(Image.open(labs / "ADE_train_00000002.png")).copy()
    lab2[:4, :4] = 9  # reduced: 8, beyond 6 classes
    Image.fromarray(lab2, "L").save(labs / "ADE_train_00000002.png")
    (labs / "ADE_train_00000003.png").unlink()
    (imgs / "ADE_train_00000004.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # copytree copied it

    skip = BadRecordCounter()
    ds = ADE20KDataset(root, "train", skip=skip, num_classes=6)
    assert len(ds) == 23 and "ADE_train_00000003" not in ds.ids
    assert skip.counts == {"no annotation": 1}
    recs = [ds[i] for i in range(len(ds))]
    bad = {r.record_id: r.reason for r in recs if isinstance(r, SkippedRecord)}
    assert bad == {"ADE_train_00000001": "label size mismatch", "ADE_train_00000004": "image unreadable"}
    rec2 = recs[ds.ids.index("ADE_train_00000002")]
    assert not isinstance(rec2, SkippedRecord) and (rec2["label"][:4, :4] == 255).all()
    assert rec2["label"].max() == 255 and set(np.unique(rec2["label"][4:])) <= {0, 1, 2, 3, 4, 5, 255}
    assert skip.counts == {"no annotation": 1, "label size mismatch": 1, "image unreadable": 1,
                           "label id out of range": 1}
    # without num_classes the id is kept (8 after the reduction)
    assert ADE20KDataset(root, "train")[ds.ids.index("ADE_train_00000002")]["label"][0, 0] == 8

    with pytest.raises(BadRecordError, match="no annotation"):
        ADE20KDataset(root, "train", skip=BadRecordCounter(strict=True))
    (imgs / "ADE_train_00000003.jpg").unlink()
    strict = ADE20KDataset(root, "train", skip=BadRecordCounter(strict=True), num_classes=6)
    cases = (("01", "label size mismatch"), ("02", "label id out of range"), ("04", "image unreadable"))
    for name, reason in cases:
        with pytest.raises(BadRecordError, match=reason):
            strict[strict.ids.index(f"ADE_train_000000{name}")]
    shutil.rmtree(root / "annotations" / "validation")
    with pytest.raises(FileNotFoundError, match="annotations/validation"):
        ADE20KDataset(root, "validation")
    with pytest.raises(ValueError, match="unknown ADE20K split"):
        ADE20KDataset(root, "dev")


def test_coco_instances_reader_on_the_world(dense_world):
    p = world_paths(dense_world)
    doc = json.loads(p["coco_instances_train"].read_text())
    coco = _coco(doc)
    ds = CocoInstancesDataset(p["coco_instances_train"], p["coco_root"])
    assert len(ds) == 24 and ds.ids == sorted(ds.ids) and ds.skip.total == 0
    assert ds.cat_ids == [1, 2, 3, 4, 5] and ds.classes == list(_SHAPES) and ds.coco == doc
    total = 0
    for i in range(len(ds)):
        rec = ds[i]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=rec["image_id"]))
        n = len(anns)
        total += n
        assert rec["image"].mode == "RGB" and rec["image"].size == (64, 64) and Path(rec["path"]).is_file()
        assert rec["boxes"].dtype == torch.float32 and rec["boxes"].shape == (n, 4)
        assert rec["labels"].dtype == torch.int64
        assert rec["labels"].tolist() == [a["category_id"] for a in anns]
        assert rec["masks"].dtype == torch.uint8 and rec["masks"].shape == (n, 64, 64)
        xyxy = [[x, y, min(x + w, 64), min(y + h, 64)] for x, y, w, h in (a["bbox"] for a in anns)]
        assert torch.allclose(rec["boxes"], torch.tensor(xyxy).reshape(-1, 4), atol=1e-4)
        for a, m in zip(anns, rec["masks"]):
            assert np.array_equal(m.numpy(), coco.annToMask(a))
    assert total == len(doc["annotations"])
    boxes_only = CocoInstancesDataset(p["coco_instances_train"], p["coco_root"], with_masks=False)[0]
    assert "masks" not in boxes_only and boxes_only["boxes"].shape[1] == 4


def _edited_instances(world: Path, tmp_path: Path) -> tuple[Path, dict]:
    """The world's val instances with one bad or special annotation or image of each kind added."""
    p = world_paths(world)
    doc = copy.deepcopy(json.loads(p["coco_instances_val"].read_text()))
    first = doc["images"][0]
    img_id = first["id"]
    good = next(a for a in doc["annotations"] if a["image_id"] == img_id)
    square = [[10, 10, 20, 10, 20, 20, 10, 20]]
    disc = np.zeros((64, 64), np.uint8)
    disc[30:40, 30:40] = 1
    compressed = mask_api.encode(np.asfortranarray(disc))
    compressed["counts"] = compressed["counts"].decode()
    extra = [
        (101, {"bbox": [10, 10, 0, 5], "segmentation": square}),  # no width: bad box
        (102, {"bbox": [100, 100, 10, 10], "segmentation": square}),  # outside the image: bad box
        (103, {"bbox": [10, 10, float("nan"), 5], "segmentation": square}),  # not finite: bad box
        (104, {"bbox": [-5, 50, 20, 30], "segmentation": square}),  # partly outside: clipped
        (105, {"bbox": [10, 10, 10, 10], "segmentation": [[1, 2, 3, 4]]}),  # two points: bad segmentation
        (106, {"bbox": [10, 10, 10, 10], "segmentation": [[1, 2, 3, 4, 5, 6, 7]]}),  # odd: bad segmentation
        (107, {"bbox": [10, 10, 10, 10], "segmentation": {"counts": [1024], "size": [32, 32]}}),  # wrong size
        (108, {"bbox": [10, 10, 10, 10], "segmentation": square, "iscrowd": 1}),  # crowd: left out, uncounted
        (109, {"bbox": [30, 30, 10, 10], "segmentation": compressed}),  # compressed RLE: kept
        (110, {"bbox": [10, 10, 10, 10], "segmentation": square, "category_id": 77}),  # unknown category
        (111, {"bbox": [10, 10, 10, 10], "segmentation": square, "image_id": 9999}),  # unknown image
    ]
    for aid, fields in extra:
        doc["annotations"].append({**good, "iscrowd": 0, "area": 100.0, "id": aid, **fields})
    doc["images"].append({**first, "id": 5000})  # an existing file but no annotation
    doc["images"].append({**first, "id": 5001, "file_name": "val2014/missing.jpg"})
    ann_file = tmp_path / "instances_edited.json"
    ann_file.write_text(json.dumps(doc))
    return ann_file, doc


def test_coco_instances_reader_drops_and_counts_bad_annotations(dense_world, tmp_path):
    ann_file, doc = _edited_instances(dense_world, tmp_path)
    root = world_paths(dense_world)["coco_root"]
    skip = BadRecordCounter()
    ds = CocoInstancesDataset(ann_file, root, skip=skip)
    assert skip.counts == {"bad box": 3, "bad segmentation": 3, "unknown category": 1, "unknown image": 1,
                           "image missing": 1, "no annotations": 1}
    bad_ids = {r.record_id for r in skip.records()}
    assert {"101", "102", "103", "105", "106", "107", "110", "111", "5000", "5001"} == bad_ids
    assert len(ds) == 3 and 5000 not in ds.ids
    first = doc["images"][0]["id"]
    rec = ds[ds.ids.index(first)]
    n_world = sum(a["image_id"] == first for a in doc["annotations"][: -11])
    assert rec["boxes"].shape == (n_world + 2, 4)  # + the clipped box and the compressed RLE (no crowd)
    assert rec["boxes"][-2].tolist() == [0.0, 50.0, 15.0, 64.0]
    assert rec["masks"][-1].sum() == 100 and rec["masks"][-1][30:40, 30:40].all()
    assert rec["masks"][-2][10:20, 10:20].sum() > 80

    evaluation = CocoInstancesDataset(ann_file, root, skip_empty=False)
    empty = evaluation[evaluation.ids.index(5000)]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["masks"].shape == (0, 64, 64)
    assert evaluation.skip.counts["image missing"] == 1 and "no annotations" not in evaluation.skip.counts

    with pytest.raises(BadRecordError, match="bad box"):
        CocoInstancesDataset(ann_file, root, skip=BadRecordCounter(strict=True))


def test_coco_instances_reader_unreadable_image_and_missing_pycocotools(dense_world, tmp_path, monkeypatch):
    p = world_paths(dense_world)
    root = tmp_path / "coco"
    shutil.copytree(p["coco_root"], root)
    doc = json.loads(p["coco_instances_val"].read_text())
    (root / doc["images"][0]["file_name"]).write_bytes(b"\xff\xd8 broken")  # a copy, not the world's file
    ds = CocoInstancesDataset(p["coco_instances_val"], root)
    bad = ds[0]
    assert isinstance(bad, SkippedRecord) and bad.reason == "image unreadable"
    assert bad.record_id == str(ds.ids[0])
    with pytest.raises(BadRecordError, match="image unreadable"):
        CocoInstancesDataset(p["coco_instances_val"], root, skip=BadRecordCounter(strict=True))[0]

    monkeypatch.setitem(__import__("sys").modules, "pycocotools", None)
    monkeypatch.setitem(__import__("sys").modules, "pycocotools.mask", None)
    with pytest.raises(ImportError, match=r"imglish\[eval\]"):
        CocoInstancesDataset(p["coco_instances_val"], p["coco_root"])
    rec = CocoInstancesDataset(p["coco_instances_val"], p["coco_root"], with_masks=False)[0]
    assert "masks" not in rec and len(rec["boxes"]) >= 1


def test_cocoeval_of_the_world_ground_truth_as_predictions_is_100(dense_world):
    """Results made from the world's own annotations (boxes, polygons and circle RLEs as masks) score AP 100."""
    from imglish.evaluation.dense import coco_evaluate, mask_to_rle

    doc = json.loads(world_paths(dense_world)["coco_instances_val"].read_text())
    coco = _coco(doc)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": mask_to_rle(coco.annToMask(a))} for a in doc["annotations"]]
    m = coco_evaluate(doc, results)
    assert m["bbox_AP"] == pytest.approx(100.0) and m["segm_AP"] == pytest.approx(100.0)
    assert m["bbox_AP50"] == pytest.approx(100.0) and m["segm_AR100"] == pytest.approx(100.0)
    shifted = [{**r, "bbox": [r["bbox"][0] + 0.6 * r["bbox"][2], *r["bbox"][1:]]} for r in results]
    assert coco_evaluate(doc, shifted, iou_types=("bbox",))["bbox_AP"] < 20
