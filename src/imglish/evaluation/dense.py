"""Dense-prediction metrics: semantic segmentation (ADE20K style) and COCO detection / instance segmentation.

Semantic segmentation
    :func:`confusion_matrix` counts (ground truth, prediction) pixel pairs; :class:`SegmentationMeter` sums it
    over a split (and across ranks); :func:`segmentation_metrics` turns a matrix into ``aAcc``, ``mIoU``,
    ``mAcc`` and the per-class ``IoU.<name>`` / ``Acc.<name>``, in percent, with the conventions of
    mmsegmentation's ``IoUMetric``: a class that appears neither in the ground truth nor in the prediction has
    no IoU and is left out of ``mIoU``; a class that is predicted but absent from the ground truth has IoU 0,
    which *is* averaged in; ``mAcc`` averages the recall of the classes present in the ground truth.

COCO detection and instance segmentation
    :func:`detections_to_coco` turns torchvision-style outputs into COCO result dicts (boxes as
    ``[x, y, w, h]``, masks as compressed RLE via :func:`mask_to_rle`); :func:`coco_evaluate` scores them with
    pycocotools' ``COCOeval``. pycocotools belongs to the optional ``eval`` extra and is imported only by the
    functions that need it (:func:`mask_to_rle`, :func:`rle_to_mask`, :func:`detections_to_coco` with masks,
    :func:`coco_evaluate`).
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SegmentationMeter",
    "coco_evaluate",
    "confusion_matrix",
    "detections_to_coco",
    "mask_to_rle",
    "rle_to_mask",
    "segmentation_metrics",
]

_INSTALL_HINT = 'pip install "imglish[eval]"'

# ------------------------------------------------------------------------------------------------------------
# Semantic segmentation
# ------------------------------------------------------------------------------------------------------------


def _as_label_tensor(value: Tensor | np.ndarray, what: str) -> Tensor:
    tensor = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(
            f"{what} must hold integer class indices, got dtype {tensor.dtype} "
            "(take the argmax over the class dimension of the logits first)"
        )
    return tensor


def confusion_matrix(
    pred: Tensor | np.ndarray, target: Tensor | np.ndarray, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """Pixel confusion matrix: ``matrix[g, p]`` counts the pixels of ground-truth class ``g`` predicted ``p``.

    Pixels whose target is ``ignore_index``, or any value outside ``0 .. num_classes - 1``, are not counted.
    The count runs with one :func:`torch.bincount` on the device of the inputs (numpy arrays are taken as CPU
    tensors).

    Args:
        pred: predicted class indices, any shape (for instance ``(N, H, W)`` after an argmax over classes).
        target: ground-truth class indices, the same shape as ``pred``.
        num_classes: number of classes ``C``.
        ignore_index: target value of pixels that are not scored.

    Returns:
        a ``(C, C)`` int64 tensor on the device of ``pred``; rows are ground truth, columns predictions.

    Raises:
        ValueError: if the shapes differ, ``num_classes`` is not positive, or a counted pixel has a prediction
            outside ``0 .. C - 1``.
        TypeError: if either input holds floating-point values.
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    pred = _as_label_tensor(pred, "pred")
    target = _as_label_tensor(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got pred {tuple(pred.shape)} "
            f"and target {tuple(target.shape)}"
        )
    target = target.to(pred.device).reshape(-1).long()
    pred = pred.reshape(-1).long()
    counted = (target >= 0) & (target < num_classes) & (target != ignore_index)
    target = target[counted]
    pred = pred[counted]
    if bool(((pred < 0) | (pred >= num_classes)).any()):  # one device sync
        raise ValueError(
            f"predictions must lie in 0..{num_classes - 1}, "
            f"got values from {int(pred.min())} to {int(pred.max())}"
        )
    flat = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _percent(value: float) -> float:
    return float(value) * 100.0


def segmentation_metrics(
    matrix: Tensor | np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str] | None = None
) -> dict[str, float]:
    """Segmentation scores, in percent, from a confusion matrix (rows ground truth, columns prediction).

    * ``aAcc``: correctly classified pixels over all counted pixels.
    * ``IoU.<name>``: ``TP / (TP + FP + FN)`` of each class whose union ``TP + FP + FN`` is not empty; a class
      seen in neither the ground truth nor the prediction has no IoU and no key (a class predicted but absent
      from the ground truth has IoU 0).
    * ``mIoU``: the mean of the per-class IoUs that exist.
    * ``Acc.<name>``: the recall ``TP / (TP + FN)`` of each class present in the ground truth (no key
      otherwise).
    * ``mAcc``: the mean of those recalls.

    No value is NaN, so the dict can go to JSON as it is.

    Args:
        matrix: a square ``(C, C)`` matrix of non-negative counts (tensor, array or nested lists, so a saved
            matrix can be scored again).
        class_names: ``C`` distinct names for the per-class keys; the class index (``"0"``, ``"1"``, ...) when
            None.

    Returns:
        ``{"aAcc", "mIoU", "mAcc", "IoU.<name>"..., "Acc.<name>"...}``.

    Raises:
        ValueError: if the matrix is not square, has negative entries or counts no pixel, or ``class_names``
            does not give one distinct name per class.
    """
    counts = torch.as_tensor(np.asarray(matrix.cpu() if isinstance(matrix, Tensor) else matrix))
    if counts.dim() != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"the confusion matrix must be square (C, C), got shape {tuple(counts.shape)}")
    counts = counts.to(torch.float64)
    if bool((counts < 0).any()):
        raise ValueError("the confusion matrix has negative entries")
    num_classes = counts.shape[0]
    names = _class_names(class_names, num_classes)
    total = float(counts.sum())
    if total == 0:
        raise ValueError("the confusion matrix counts no pixel: nothing to score")

    tp = counts.diagonal()
    gt_area = counts.sum(dim=1)
    pred_area = counts.sum(dim=0)
    union = gt_area + pred_area - tp
    has_union = union > 0
    has_gt = gt_area > 0
    iou = tp[has_union] / union[has_union]
    acc = tp[has_gt] / gt_area[has_gt]

    result = {
        "aAcc": _percent(tp.sum() / total),
        "mIoU": _percent(iou.mean()),
        # has_gt is never empty here since total > 0
        "mAcc": _percent(acc.mean()),
    }
    for index in range(num_classes):
        if has_union[index]:
            result[f"IoU.{names[index]}"] = _percent(tp[index] / union[index])
    for index in range(num_classes):
        if has_gt[index]:
            result[f"Acc.{names[index]}"] = _percent(tp[index] / gt_area[index])
    return result


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(index) for index in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for {num_classes} classes")
    if len(set(names)) != len(names):
        raise ValueError("class names must be distinct (they name the per-class keys)")
    return names


class SegmentationMeter:
    """Accumulates the pixel confusion matrix of a segmentation split and scores it.

    The matrix is int64 (a split of 2000 images of 512x512 counts about 5e8 pixels, far below 2**63) and lives
    on the device of the first batch passed to :meth:`update`, so accumulating GPU predictions never syncs
    beyond the range check of :func:`confusion_matrix`.

    In a distributed evaluation each rank updates with its own shard, then every rank calls :meth:`all_reduce`
    once (it sums the matrices in place, so a second call would count twice) before :meth:`compute`.

    Args:
        num_classes: number of classes ``C``.
        ignore_index: target value of pixels that are not scored.
        class_names: ``C`` distinct names for the per-class keys of :meth:`compute` (indices when None).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.class_names = None if class_names is None else _class_names(class_names, self.num_classes)
        self._matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Forgets every counted pixel (the matrix keeps its device)."""
        self._matrix.zero_()

    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """Adds the pixels of one batch (see :func:`confusion_matrix` for the arguments)."""
        batch = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        if batch.device != self._matrix.device:
            self._matrix = self._matrix.to(batch.device)
        self._matrix += batch

    def merge(self, other: SegmentationMeter) -> SegmentationMeter:
        """Adds the counts of another meter over the same classes; returns ``self``."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge a meter of {other.num_classes} classes (ignore_index {other.ignore_index}) "
                f"into one of {self.num_classes} classes (ignore_index {self.ignore_index})"
            )
        self._matrix += other._matrix.to(self._matrix.device)
        return self

    @property
    def matrix(self) -> Tensor:
        """A CPU copy of the accumulated ``(C, C)`` int64 matrix (rows ground truth, columns prediction)."""
        return self._matrix.detach().cpu().clone()

    def state_dict(self) -> dict[str, Any]:
        """The meter's settings and a CPU copy of its matrix."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "class_names": None if self.class_names is None else list(self.class_names),
            "matrix": self.matrix,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned (the number of classes must match)."""
        matrix = torch.as_tensor(state["matrix"], dtype=torch.int64)
        if int(state["num_classes"]) != self.num_classes or matrix.shape != self._matrix.shape:
            raise ValueError(
                f"the state is for {state['num_classes']} classes (matrix {tuple(matrix.shape)}), "
                f"this meter has {self.num_classes}"
            )
        self.ignore_index = int(state.get("ignore_index", self.ignore_index))
        names = state.get("class_names")
        self.class_names = None if names is None else _class_names(names, self.num_classes)
        self._matrix = matrix.to(self._matrix.device).clone()

    def all_reduce(self) -> SegmentationMeter:
        """Sums the matrix over all ranks with :mod:`torch.distributed`; a no-op when it is not initialised.

        With the NCCL backend a matrix that is still on the CPU (a rank that saw no batch) is reduced on the
        current CUDA device and kept there. Returns ``self``.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if "nccl" in str(dist.get_backend()).lower() and self._matrix.device.type != "cuda":
            self._matrix = self._matrix.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(self._matrix, op=dist.ReduceOp.SUM)
        return self

    def compute(self) -> dict[str, float]:
        """:func:`segmentation_metrics` of the accumulated matrix (percent, no NaN)."""
        return segmentation_metrics(self._matrix, self.class_names)

    def __repr__(self) -> str:
        pixels = int(self._matrix.sum())
        return (
            f"SegmentationMeter(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={pixels})"
        )


# ------------------------------------------------------------------------------------------------------------
# COCO: masks, result conversion, evaluation
# ------------------------------------------------------------------------------------------------------------


def _mask_api():
    try:
        from pycocotools import mask as mask_api
    except ImportError as err:
        raise ImportError(f"COCO masks and evaluation need pycocotools: {_INSTALL_HINT}") from err
    return mask_api


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return np.asarray(value)


def _compressed(rle: dict) -> dict:
    """A copy of a pycocotools RLE with its byte counts turned into text (JSON-ready)."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def _binary_masks(masks: np.ndarray, what: str) -> np.ndarray:
    if masks.dtype == np.bool_:
        return masks
    if not np.issubdtype(masks.dtype, np.integer):
        raise TypeError(
            f"{what} must be boolean or integer (0/1), got dtype {masks.dtype}; threshold it first"
        )
    return masks != 0


def mask_to_rle(mask: Tensor | np.ndarray) -> dict[str, Any]:
    """Encodes one binary mask as COCO compressed RLE.

    Args:
        mask: an ``(H, W)`` boolean or integer array or tensor; non-zero pixels are foreground (float masks
            are refused: threshold them first, as :func:`detections_to_coco` does).

    Returns:
        ``{"size": [H, W], "counts": str}``, ready for :func:`json.dumps` and for pycocotools.
    """
    array = _to_numpy(mask)
    if array.ndim != 2:
        raise ValueError(f"expected one (H, W) mask, got shape {array.shape}")
    binary = _binary_masks(array, "mask")
    rle = _mask_api().encode(np.asfortranarray(binary.astype(np.uint8)))
    return _compressed(rle)


def rle_to_mask(rle: dict[str, Any] | list, h: int, w: int) -> np.ndarray:
    """Decodes a COCO segmentation into an ``(h, w)`` boolean mask.

    Args:
        rle: a compressed RLE (``counts`` as str or bytes), an uncompressed RLE (``counts`` as a list of run
            lengths) or a list of polygons.
        h: image height.
        w: image width.

    Returns:
        an ``(h, w)`` numpy bool array.

    Raises:
        ValueError: if the RLE's ``size`` is not ``[h, w]``.
    """
    mask_api = _mask_api()
    if isinstance(rle, list):
        encoded = mask_api.merge(mask_api.frPyObjects(rle, h, w))
    else:
        size = [int(s) for s in rle["size"]]
        if size != [int(h), int(w)]:
            raise ValueError(f"the RLE is of size {size}, expected [{h}, {w}]")
        if isinstance(rle["counts"], list):
            encoded = mask_api.frPyObjects(rle, h, w)
        else:
            counts = rle["counts"]
            encoded = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():
        # pycocotools' decode trips a NumPy 2 DeprecationWarning about __array__(copy=...) inside its own code
        warnings.filterwarnings("ignore", message=r".*__array__ implementation", category=DeprecationWarning)
        decoded = mask_api.decode(encoded)
    return decoded.astype(bool)


def _plain_id(value: Any) -> Any:
    if isinstance(value, Tensor):
        value = value.item()
    try:
        return operator.index(value)
    except TypeError:
        return value


def detections_to_coco(
    image_id: int,
    boxes_xyxy: Tensor | np.ndarray,
    scores: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    masks: Tensor | np.ndarray | None = None,
    cat_ids: Sequence[int] | None = None,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Turns the detections of one image (torchvision convention) into COCO result dicts.

    Args:
        image_id: the COCO id of the image.
        boxes_xyxy: ``(N, 4)`` boxes as ``x1, y1, x2, y2`` in pixels of the original image.
        scores: ``(N,)`` confidences.
        labels: ``(N,)`` contiguous labels ``1 .. K`` (0 is the background of torchvision detectors and is
            refused).
        masks: optional ``(N, 1, H, W)`` or ``(N, H, W)`` mask probabilities; a pixel is foreground when its
            value is at least ``mask_threshold`` (boolean masks are taken as they are).
        cat_ids: COCO category id of each label: label ``k`` becomes ``cat_ids[k - 1]``; the label itself when
            None.
        mask_threshold: see ``masks``.

    Returns:
        one ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` dict per detection, plus
        ``"segmentation"`` (compressed RLE, ``counts`` as str) when masks are given; plain Python numbers
        only.

    Raises:
        ValueError: on inconsistent lengths or shapes, or a label outside ``1 .. K``.
        TypeError: if the labels are not integers.
    """
    boxes = _to_numpy(boxes_xyxy).astype(np.float64, copy=False).reshape(-1, 4)
    score_values = _to_numpy(scores).astype(np.float64, copy=False).reshape(-1)
    label_values = _to_numpy(labels).reshape(-1)
    count = boxes.shape[0]
    if score_values.shape[0] != count or label_values.shape[0] != count:
        raise ValueError(
            f"got {count} boxes, {score_values.shape[0]} scores and {label_values.shape[0]} labels"
        )
    if count and not np.issubdtype(label_values.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {label_values.dtype}")
    label_values = label_values.astype(np.int64, copy=False)
    top = len(cat_ids) if cat_ids is not None else None
    if count:
        low, high = int(label_values.min()), int(label_values.max())
        if low < 1 or (top is not None and high > top):
            bound = f"1..{top}" if top is not None else "1 or more"
            raise ValueError(f"labels must be {bound}, got values from {low} to {high}")

    rles: list[dict] | None = None
    if masks is not None:
        mask_values = masks.detach() if isinstance(masks, Tensor) else np.asarray(masks)
        if mask_values.ndim == 4 and mask_values.shape[1] == 1:
            mask_values = mask_values[:, 0]
        if mask_values.ndim != 3 or mask_values.shape[0] != count:
            raise ValueError(f"masks must be ({count}, 1, H, W) or ({count}, H, W), got {tuple(masks.shape)}")
        if isinstance(mask_values, Tensor):
            binary = mask_values if mask_values.dtype == torch.bool else mask_values >= mask_threshold
            binary = binary.cpu().numpy()
        else:
            binary = mask_values if mask_values.dtype == np.bool_ else mask_values >= mask_threshold
        if count:
            # pycocotools encodes an (H, W, N) Fortran-ordered uint8 stack in one call
            stack = np.asfortranarray(np.moveaxis(binary.astype(np.uint8), 0, -1))
            rles = [_compressed(rle) for rle in _mask_api().encode(stack)]
        else:
            rles = []

    plain_image_id = _plain_id(image_id)
    results = []
    for index in range(count):
        x1, y1, x2, y2 = (float(v) for v in boxes[index])
        label = int(label_values[index])
        entry: dict[str, Any] = {
            "image_id": plain_image_id,
            "category_id": int(cat_ids[label - 1]) if cat_ids is not None else label,
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(score_values[index]),
        }
        if rles is not None:
            entry["segmentation"] = rles[index]
        results.append(entry)
    return results


_IOU_TYPES = ("bbox", "segm")
_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_AR100_STAT = 8


def _ground_truth_copy(ground_truth: Mapping[str, Any], mask_api: Any) -> dict[str, Any]:
    """A copy that COCOeval may mutate, with the keys old pycocotools versions want and default crowd/area."""
    for key in ("images", "annotations", "categories"):
        if key not in ground_truth:
            raise ValueError(f"the ground truth has no {key!r} list")
    dataset = dict(ground_truth)
    dataset.setdefault("info", {})
    dataset.setdefault("licenses", [])
    sizes = {img["id"]: (img.get("height"), img.get("width")) for img in ground_truth["images"]}
    annotations = []
    for ann in ground_truth["annotations"]:
        ann = dict(ann)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = _annotation_area(ann, sizes.get(ann.get("image_id")), mask_api)
        annotations.append(ann)
    dataset["annotations"] = annotations
    return dataset


def _annotation_area(ann: Mapping[str, Any], size: tuple | None, mask_api: Any) -> float:
    segmentation = ann.get("segmentation")
    if segmentation and size is not None and None not in size:
        return float(mask_api.area(_to_rle(segmentation, *size, mask_api)))
    if "bbox" in ann:
        return float(ann["bbox"][2]) * float(ann["bbox"][3])
    raise ValueError(f"annotation {ann.get('id')!r} has neither an area, a segmentation nor a bbox")


def _to_rle(segmentation: Any, h: int, w: int, mask_api: Any) -> dict:
    if isinstance(segmentation, list):
        return mask_api.merge(mask_api.frPyObjects(segmentation, h, w))
    if isinstance(segmentation["counts"], list):
        return mask_api.frPyObjects(segmentation, h, w)
    return segmentation


def _check_results(results: Sequence[Mapping[str, Any]], dataset: Mapping[str, Any]) -> None:
    image_ids = {img["id"] for img in dataset["images"]}
    category_ids = {cat["id"] for cat in dataset["categories"]}
    for index, result in enumerate(results):
        for key in ("image_id", "category_id", "score"):
            if key not in result:
                raise ValueError(f"result {index} has no {key!r}")
        if result["image_id"] not in image_ids:
            raise ValueError(
                f"result {index} refers to image id {result['image_id']!r}, unknown to the ground truth"
            )
        if result["category_id"] not in category_ids:
            raise ValueError(
                f"result {index} has category id {result['category_id']!r}, unknown to the ground truth "
                "(were the contiguous labels mapped with cat_ids?)"
            )


def _results_for(
    iou_type: str, results: Sequence[Mapping[str, Any]], sizes: Mapping[Any, tuple], mask_api: Any
) -> list[dict]:
    """Fresh dicts holding only what one IoU type needs (loadRes mutates them)."""
    field = "bbox" if iou_type == "bbox" else "segmentation"
    missing = [index for index, result in enumerate(results) if field not in result]
    if missing:
        hint = ' (pass iou_types=("bbox",) to score boxes only)' if iou_type == "segm" else ""
        raise ValueError(
            f"{iou_type} evaluation needs a {field!r} in every result; "
            f"{len(missing)} of {len(results)} have none, the first is result {missing[0]}{hint}"
        )
    prepared = []
    for result in results:
        entry = {
            "image_id": result["image_id"],
            "category_id": result["category_id"],
            "score": result["score"],
        }
        if iou_type == "bbox":
            entry["bbox"] = [float(v) for v in result["bbox"]]
        else:
            # Without a box, loadRes takes the area from the mask, so the small/medium/large ranges of segm
            # use mask areas, as the ground truth does. Polygons and uncompressed RLE are compressed here.
            segmentation = result["segmentation"]
            if isinstance(segmentation, list) or isinstance(segmentation.get("counts"), list):
                if result["image_id"] not in sizes:
                    raise ValueError(
                        f"image {result['image_id']!r} has no height/width to decode its polygons"
                    )
                segmentation = _to_rle(segmentation, *sizes[result["image_id"]], mask_api)
            entry["segmentation"] = segmentation
        prepared.append(entry)
    return prepared


def coco_evaluate(
    ground_truth: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    iou_types: Iterable[str] | str = ("bbox", "segm"),
) -> dict[str, float]:
    """Scores COCO results against a ground truth with pycocotools' ``COCOeval``, printing nothing.

    For each IoU type ``t`` the dict holds ``t_AP, t_AP50, t_AP75, t_APs, t_APm, t_APl`` (the first six
    ``COCOeval.stats``) and ``t_AR100`` (recall at 100 detections, stat 8), in percent. A stat that COCOeval
    reports as -1, because no ground truth falls in its area range (for instance ``APs`` without small
    objects), is returned as ``-1.0``, not scaled.

    Empty ``results`` are scored as a model that found nothing (pycocotools' ``loadRes`` cannot take an empty
    list, so the empty detection set is built directly): every AP and AR is 0.0, except the stats that are
    -1.0 by the rule above.

    Neither argument is modified. Ground-truth annotations without ``iscrowd`` count as not crowd, and without
    ``area`` get the area of their segmentation (or of their box when they have none); missing ``info`` and
    ``licenses`` keys are added on the copy. For ``segm`` the results' boxes are not passed on, so that the
    area ranges use mask areas.

    Args:
        ground_truth: a COCO instances dict (``images`` with ``height``/``width``, ``annotations``,
            ``categories``).
        results: COCO result dicts, e.g. from :func:`detections_to_coco`.
        iou_types: ``"bbox"``, ``"segm"`` or both.

    Returns:
        ``{"bbox_AP": ..., ..., "bbox_AR100": ..., "segm_AP": ..., ...}`` for the requested types.

    Raises:
        ImportError: without pycocotools (``pip install "imglish[eval]"``).
        ValueError: on an unknown IoU type; a result whose image or category id the ground truth does not
            know, or that lacks a key; ``segm`` requested while some results carry no ``segmentation`` (the
            error says so: score boxes only with ``iou_types=("bbox",)``).
    """
    types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    unknown = [t for t in types if t not in _IOU_TYPES]
    if unknown or not types:
        raise ValueError(f"iou_types must be a non-empty selection of {_IOU_TYPES}, got {types!r}")
    mask_api = _mask_api()
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = list(results)
    dataset = _ground_truth_copy(ground_truth, mask_api)
    _check_results(results, dataset)
    sizes = {img["id"]: (img["height"], img["width"]) for img in dataset["images"] if "height" in img}
    prepared = {t: _results_for(t, results, sizes, mask_api) for t in types}

    scores: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        for iou_type in types:
            if prepared[iou_type]:
                coco_dt = coco_gt.loadRes(prepared[iou_type])
            else:
                coco_dt = COCO()
                coco_dt.dataset = {
                    "info": {},
                    "images": list(dataset["images"]),
                    "categories": list(dataset["categories"]),
                    "annotations": [],
                }
                coco_dt.createIndex()
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats = evaluator.stats
            for position, name in enumerate(_STAT_NAMES):
                scores[f"{iou_type}_{name}"] = _coco_stat(stats[position])
            scores[f"{iou_type}_AR100"] = _coco_stat(stats[_AR100_STAT])
    return scores


def _coco_stat(value: float) -> float:
    value = float(value)
    if value == -1.0 or math.isnan(value):
        return -1.0
    return value * 100.0
