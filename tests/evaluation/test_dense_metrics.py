"""Segmentation (confusion matrix, mIoU/aAcc/mAcc) and COCO detection metrics, on hand-made examples."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from imglish.evaluation.dense import (
    SegmentationMeter,
    coco_evaluate,
    confusion_matrix,
    detections_to_coco,
    mask_to_rle,
    rle_to_mask,
    segmentation_metrics,
)

# ------------------------------------------------------------------------------------------------------------
# Semantic segmentation
# ------------------------------------------------------------------------------------------------------------

# 4 classes; class 3 appears nowhere that is counted (its one prediction falls on an ignored pixel).
TARGET = torch.tensor(
    [
        [0, 0, 1, 1],
        [0, 2, 2, 255],
        [1, 1, 255, 2],
    ]
)
PRED = torch.tensor(
    [
        [0, 1, 1, 1],
        [0, 2, 1, 0],
        [1, 2, 3, 2],
    ]
)
# The 10 counted pixels as (ground truth -> prediction):
#   gt 0: 0, 1, 0          -> row [2, 1, 0, 0]
#   gt 1: 1, 1, 1, 2       -> row [0, 3, 1, 0]
#   gt 2: 2, 1, 2          -> row [0, 1, 2, 0]
#   gt 3: none             -> row [0, 0, 0, 0]
EXPECTED_MATRIX = [
    [2, 1, 0, 0],
    [0, 3, 1, 0],
    [0, 1, 2, 0],
    [0, 0, 0, 0],
]
# TP = 2 + 3 + 2 = 7 of 10 pixels -> aAcc 70.
# class 0: union 3 + 2 - 2 = 3 -> IoU 2/3, recall 2/3
# class 1: union 4 + 5 - 3 = 6 -> IoU 1/2, recall 3/4
# class 2: union 3 + 3 - 2 = 4 -> IoU 1/2, recall 2/3
# class 3: union 0 -> no IoU, not in the means
# mIoU = (2/3 + 1/2 + 1/2) / 3 = 5/9;  mAcc = (2/3 + 3/4 + 2/3) / 3 = 25/36
EXPECTED_METRICS = {
    "aAcc": 70.0,
    "mIoU": 500.0 / 9.0,
    "mAcc": 2500.0 / 36.0,
    "IoU.0": 200.0 / 3.0,
    "IoU.1": 50.0,
    "IoU.2": 50.0,
    "Acc.0": 200.0 / 3.0,
    "Acc.1": 75.0,
    "Acc.2": 200.0 / 3.0,
}


def test_confusion_matrix_by_hand():
    matrix = confusion_matrix(PRED, TARGET, num_classes=4)
    assert matrix.dtype == torch.int64
    assert matrix.tolist() == EXPECTED_MATRIX


def test_confusion_matrix_skips_targets_outside_the_classes():
    target = TARGET.clone()
    target[0, 0] = -1  # not a class
    target[0, 1] = 7  # not a class either
    matrix = confusion_matrix(PRED, target, num_classes=4)
    expected = [row[:] for row in EXPECTED_MATRIX]
    expected[0][0] -= 1
    expected[0][1] -= 1
    assert matrix.tolist() == expected


def test_confusion_matrix_takes_numpy_and_any_shape():
    matrix = confusion_matrix(PRED.numpy()[None, None], TARGET.numpy()[None, None], num_classes=4)
    assert matrix.tolist() == EXPECTED_MATRIX


def test_confusion_matrix_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        confusion_matrix(PRED, TARGET.T, num_classes=4)
    with pytest.raises(ValueError, match="0..3"):
        confusion_matrix(torch.full_like(PRED, 4), TARGET, num_classes=4)
    with pytest.raises(TypeError, match="argmax"):
        confusion_matrix(PRED.float(), TARGET, num_classes=4)


def test_metrics_by_hand():
    metrics = segmentation_metrics(torch.tensor(EXPECTED_MATRIX))
    assert set(metrics) == set(EXPECTED_METRICS)
    for key, value in EXPECTED_METRICS.items():
        assert metrics[key] == pytest.approx(value), key
    json.dumps(metrics, allow_nan=False)


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero_iou():
    target = torch.tensor([[0, 0], [1, 1]])
    pred = torch.tensor([[0, 2], [1, 1]])
    metrics = segmentation_metrics(confusion_matrix(pred, target, num_classes=3))
    # class 0: IoU 1/2, recall 1/2;  class 1: IoU 1, recall 1;  class 2: IoU 0 (union 1), no recall
    assert metrics["IoU.2"] == 0.0
    assert metrics["mIoU"] == pytest.approx(50.0)  # (1/2 + 1 + 0) / 3
    assert metrics["aAcc"] == pytest.approx(75.0)
    assert metrics["mAcc"] == pytest.approx(75.0)  # (1/2 + 1) / 2
    assert "Acc.2" not in metrics


def test_perfect_prediction():
    target = torch.randint(0, 5, (2, 6, 7), generator=torch.Generator().manual_seed(0))
    target[0, 0, :3] = 255
    meter = SegmentationMeter(5)
    meter.update(target.clone(), target)
    metrics = meter.compute()
    assert metrics["mIoU"] == 100.0
    assert metrics["aAcc"] == 100.0
    assert metrics["mAcc"] == 100.0


def test_accumulation_equals_one_update_over_the_concatenation():
    generator = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 6, (5, 8, 9), generator=generator)
    targets[targets == 5] = 255  # some ignored pixels
    preds = torch.randint(0, 5, (5, 8, 9), generator=generator)
    whole = confusion_matrix(preds, targets, num_classes=5)

    meter = SegmentationMeter(5, class_names=["a", "b", "c", "d", "e"])
    for pred, target in zip(preds.split(2), targets.split(2)):
        meter.update(pred, target)
    assert torch.equal(meter.matrix, whole)

    first, second = SegmentationMeter(5), SegmentationMeter(5)
    first.update(preds[:3], targets[:3])
    second.update(preds[3:], targets[3:])
    assert torch.equal(first.merge(second).matrix, whole)

    named = {}
    for key, value in segmentation_metrics(whole).items():
        if "." in key:
            prefix, index = key.split(".")
            key = f"{prefix}.{'abcde'[int(index)]}"
        named[key] = value
    assert meter.compute() == named
    # a saved matrix (as JSON lists) scores the same
    assert segmentation_metrics(json.loads(json.dumps(whole.tolist()))) == segmentation_metrics(whole)


def test_meter_state_dict_round_trip_and_all_reduce_without_distributed():
    meter = SegmentationMeter(4, class_names=["w", "x", "y", "z"])
    meter.update(PRED, TARGET)
    state = meter.state_dict()
    restored = SegmentationMeter(4)
    restored.load_state_dict(state)
    assert restored.matrix.tolist() == EXPECTED_MATRIX
    assert restored.compute() == meter.compute()
    assert "IoU.w" in meter.compute() and "IoU.z" not in meter.compute()
    assert meter.all_reduce() is meter  # torch.distributed is not initialised here
    assert meter.matrix.tolist() == EXPECTED_MATRIX
    with pytest.raises(ValueError, match="classes"):
        SegmentationMeter(3).merge(meter)


def test_all_reduce_single_process_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not yet initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        meter = SegmentationMeter(4)
        meter.update(PRED, TARGET)
        meter.all_reduce()
        assert meter.matrix.tolist() == EXPECTED_MATRIX
    finally:
        dist.destroy_process_group()


def test_empty_meter_refuses_to_score():
    with pytest.raises(ValueError, match="no pixel"):
        SegmentationMeter(3).compute()


# ------------------------------------------------------------------------------------------------------------
# COCO
# ------------------------------------------------------------------------------------------------------------

needs_pycocotools = pytest.mark.skipif(
    importlib.util.find_spec("pycocotools") is None, reason="pycocotools (extra `eval`) is not installed"
)

# A 40x40 square at rows 10..49, columns 20..59 of a 100x100 image, as uncompressed (column-major) RLE:
# 20 empty columns and 10 rows of background, then 40 foreground / 60 background per column (50 rows below
# the square and 10 above it in the next column), and after the last column's 40 foreground pixels
# 50 + 40 * 100 background.
SQUARE_RLE = {"size": [100, 100], "counts": [2010] + [40, 60] * 39 + [40, 4050]}

GROUND_TRUTH = {
    "images": [
        {"id": 1, "height": 30, "width": 40, "file_name": "one.png"},
        {"id": 2, "height": 100, "width": 100, "file_name": "two.png"},
        {"id": 3, "height": 20, "width": 20, "file_name": "three.png"},  # no annotation
    ],
    "categories": [{"id": 3, "name": "box"}, {"id": 7, "name": "shape"}],
    "annotations": [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 3,
            "segmentation": [[5, 5, 25, 5, 25, 20, 5, 20]],
            "bbox": [5, 5, 20, 15],
            "area": 300,
            "iscrowd": 0,
        },
        {
            # no area, no iscrowd: coco_evaluate fills them in
            "id": 2,
            "image_id": 1,
            "category_id": 7,
            "segmentation": [[30, 2, 38, 2, 34, 12]],
            "bbox": [30, 2, 8, 10],
        },
        {
            "id": 3,
            "image_id": 2,
            "category_id": 7,
            "segmentation": SQUARE_RLE,
            "bbox": [20, 10, 40, 40],
            "area": 1600,
            "iscrowd": 0,
        },
        {
            "id": 4,
            "image_id": 2,
            "category_id": 3,
            "segmentation": [[2, 60, 15, 60, 15, 75, 2, 75]],
            "bbox": [2, 60, 13, 15],
            "area": 195,
            "iscrowd": 0,
        },
    ],
}
CAT_IDS = [3, 7]  # contiguous label k is COCO category CAT_IDS[k - 1]


def _gt_masks() -> dict[int, np.ndarray]:
    sizes = {img["id"]: (img["height"], img["width"]) for img in GROUND_TRUTH["images"]}
    return {
        ann["id"]: rle_to_mask(ann["segmentation"], *sizes[ann["image_id"]])
        for ann in GROUND_TRUTH["annotations"]
    }


def _results_from_ground_truth(box_shift: float = 0.0) -> list[dict]:
    """Detections that reproduce the ground truth (score 1), boxes optionally moved right by a share of w."""
    masks = _gt_masks()
    results = []
    for image in GROUND_TRUTH["images"]:
        anns = [ann for ann in GROUND_TRUTH["annotations"] if ann["image_id"] == image["id"]]
        if not anns:
            continue
        boxes = torch.tensor(
            [
                [x + box_shift * w, y, x + w + box_shift * w, y + h]
                for x, y, w, h in (ann["bbox"] for ann in anns)
            ]
        )
        labels = torch.tensor([CAT_IDS.index(ann["category_id"]) + 1 for ann in anns])
        probabilities = torch.stack([torch.from_numpy(masks[ann["id"]]).float() * 0.9 for ann in anns])[
            :, None
        ]
        results += detections_to_coco(
            image["id"], boxes, torch.ones(len(anns)), labels, probabilities, cat_ids=CAT_IDS
        )
    return results


@needs_pycocotools
def test_square_rle_is_the_square():
    mask = rle_to_mask(SQUARE_RLE, 100, 100)
    expected = np.zeros((100, 100), dtype=bool)
    expected[10:50, 20:60] = True
    assert np.array_equal(mask, expected)


@needs_pycocotools
def test_mask_rle_round_trip():
    mask = np.random.default_rng(0).random((7, 9)) > 0.5
    rle = mask_to_rle(mask)
    assert rle["size"] == [7, 9]
    assert isinstance(rle["counts"], str)
    json.dumps(rle)
    assert np.array_equal(rle_to_mask(rle, 7, 9), mask)
    assert mask_to_rle(torch.from_numpy(mask)) == rle
    assert mask_to_rle(mask.astype(np.uint8)) == rle
    with pytest.raises(TypeError, match="threshold"):
        mask_to_rle(mask.astype(np.float32))
    with pytest.raises(ValueError, match="size"):
        rle_to_mask(rle, 9, 7)


@needs_pycocotools
def test_polygon_decodes():
    mask = rle_to_mask([[0, 0, 4, 0, 4, 4, 0, 4]], 6, 6)
    assert mask.dtype == bool
    assert mask[1:4, 1:4].all() and not mask[5].any() and not mask[:, 5].any()


@needs_pycocotools
def test_detections_to_coco():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 4.0]])
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, 1:3, 1:4] = 0.7
    masks[0, 0, 5, 5] = 0.4  # below the threshold
    masks[1, 0, 6:, 6:] = 1.0
    results = detections_to_coco(
        torch.tensor(5), boxes, torch.tensor([0.9, 0.25]), torch.tensor([2, 1]), masks, cat_ids=[3, 7]
    )
    assert [r["bbox"] for r in results] == [[10.0, 20.0, 20.0, 40.0], [0.0, 0.0, 5.0, 4.0]]
    assert [r["category_id"] for r in results] == [7, 3]
    assert [r["image_id"] for r in results] == [5, 5]
    assert results[0]["score"] == pytest.approx(0.9)
    expected = np.zeros((8, 8), dtype=bool)
    expected[1:3, 1:4] = True
    assert np.array_equal(rle_to_mask(results[0]["segmentation"], 8, 8), expected)
    json.dumps(results)

    plain = detections_to_coco(1, boxes.numpy(), [0.5, 0.5], np.array([1, 2]))
    assert [r["category_id"] for r in plain] == [1, 2]
    assert all("segmentation" not in r for r in plain)
    assert detections_to_coco(1, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)) == []
    with pytest.raises(ValueError, match="labels"):
        detections_to_coco(1, boxes, [0.5, 0.5], [0, 1])
    with pytest.raises(ValueError, match="labels"):
        detections_to_coco(1, boxes, [0.5, 0.5], [1, 3], cat_ids=[3, 7])


@needs_pycocotools
def test_perfect_results_give_100(capsys):
    before = copy.deepcopy(GROUND_TRUTH)
    results = _results_from_ground_truth()
    results_before = copy.deepcopy(results)
    scores = coco_evaluate(GROUND_TRUTH, results)
    assert results == results_before
    assert capsys.readouterr().out == ""
    assert GROUND_TRUTH == before  # neither argument was modified
    assert "info" not in GROUND_TRUTH
    for kind in ("bbox", "segm"):
        assert scores[f"{kind}_AP"] == pytest.approx(100.0)
        assert scores[f"{kind}_AP50"] == pytest.approx(100.0)
        assert scores[f"{kind}_AP75"] == pytest.approx(100.0)
        assert scores[f"{kind}_APs"] == pytest.approx(100.0)
        assert scores[f"{kind}_APm"] == pytest.approx(100.0)
        assert scores[f"{kind}_APl"] == -1.0  # no large object in the ground truth
        assert scores[f"{kind}_AR100"] == pytest.approx(100.0)
    assert len(scores) == 14
    json.dumps(scores, allow_nan=False)


@needs_pycocotools
def test_shifted_boxes_score_less():
    # Moving each box right by 0.3 of its width leaves IoU 0.7 / 1.3 = 0.54: a match at IoU 0.5 only, so AP is
    # 1/10 of the ten thresholds. The masks are untouched and segm ignores the boxes.
    scores = coco_evaluate(GROUND_TRUTH, _results_from_ground_truth(box_shift=0.3))
    assert scores["bbox_AP50"] == pytest.approx(100.0)
    assert scores["bbox_AP75"] == pytest.approx(0.0)
    assert scores["bbox_AP"] == pytest.approx(10.0)
    assert scores["segm_AP"] == pytest.approx(100.0)


@needs_pycocotools
def test_empty_results_give_zero(capsys):
    scores = coco_evaluate(GROUND_TRUTH, [])
    assert capsys.readouterr().out == ""
    for kind in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "AR100"):
            assert scores[f"{kind}_{name}"] == 0.0
        assert scores[f"{kind}_APl"] == -1.0


@needs_pycocotools
def test_coco_evaluate_rejects_bad_results():
    results = _results_from_ground_truth()
    with pytest.raises(ValueError, match="image id 42"):
        coco_evaluate(GROUND_TRUTH, results + [dict(results[0], image_id=42)])
    with pytest.raises(ValueError, match="category id 2"):
        coco_evaluate(GROUND_TRUTH, results + [dict(results[0], category_id=2)])
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    with pytest.raises(ValueError, match="segmentation"):
        coco_evaluate(GROUND_TRUTH, boxes_only)
    assert coco_evaluate(GROUND_TRUTH, boxes_only, iou_types=("bbox",))["bbox_AP"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="iou_types"):
        coco_evaluate(GROUND_TRUTH, results, iou_types=("keypoints",))


def test_missing_pycocotools_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(ImportError, match=r'pip install "imglish\[eval\]"'):
        mask_to_rle(np.zeros((2, 2), dtype=bool))
    with pytest.raises(ImportError, match=r'pip install "imglish\[eval\]"'):
        coco_evaluate(GROUND_TRUTH, [])


def test_module_does_not_import_pycocotools():
    code = "import sys, imglish.evaluation.dense; assert 'pycocotools' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_nan_in_any_metric():
    metrics = segmentation_metrics([[0, 0, 0], [0, 5, 0], [0, 0, 0]])
    assert not any(math.isnan(v) for v in metrics.values())
    assert metrics == {"aAcc": 100.0, "mIoU": 100.0, "mAcc": 100.0, "IoU.1": 100.0, "Acc.1": 100.0}
