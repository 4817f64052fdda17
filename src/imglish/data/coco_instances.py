"""Object detection and instance segmentation records from a COCO instances JSON (``instances_*.json``).

The file holds ``images`` (``id``, ``file_name`` relative to the image root, ``width``, ``height``),
``categories`` (``id``, ``name``) and ``annotations`` (``id``, ``image_id``, ``category_id``, ``bbox`` as
``[x, y, w, h]`` in pixels, ``iscrowd``, ``segmentation`` as polygons ``[[x1, y1, x2, y2, ...], ...]`` or
an RLE ``{"counts", "size": [h, w]}``, uncompressed (a list of run lengths) or compressed (a string)).

Labels are contiguous: the sorted category ids become 1..K and 0 is left for the background, as torchvision's
detection models expect. Annotations are checked once, when the index is built: crowd regions are left out of
the targets; a box without area, with non-finite values or outside the image, an invalid polygon or an RLE of
another size than its image is dropped and counted (``"bad box"``, ``"bad segmentation"``); a box partly
outside the image is clipped to it. Masks are decoded with ``pycocotools`` (the ``eval`` extra), imported only
when needed.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imglish.data.base import RecordDataset
from imglish.data.skip import BadRecordCounter, SkippedRecord
from imglish.tokenizers.image import load_image

__all__ = ["CocoInstancesDataset"]


def _mask_api() -> Any:
    """``pycocotools.mask``, or an ImportError that says how to install it."""
    try:
        from pycocotools import mask as mask_api
    except ImportError as err:
        raise ImportError(
            'CocoInstancesDataset decodes masks with pycocotools: pip install "imglish[eval]" '
            "(or pip install pycocotools), or pass with_masks=False for boxes only"
        ) from err
    return mask_api


def _finite_numbers(values: Any) -> bool:
    return isinstance(values, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    """Why a segmentation cannot be used (None when it can)."""
    if isinstance(seg, dict):
        size = seg.get("size")
        if not _finite_numbers(size) or [int(v) for v in size] != [height, width]:
            return f"RLE size {size}, image {height}x{width}"
        counts = seg.get("counts")
        if isinstance(counts, (str, bytes)):
            return None if counts else "empty RLE counts"
        if not isinstance(counts, list) or not all(isinstance(c, int) and c >= 0 for c in counts):
            return "RLE counts must be a string or a list of non-negative integers"
        if sum(counts) != height * width:
            return f"RLE runs cover {sum(counts)} pixels, the image has {height * width}"
        return None
    if isinstance(seg, list) and seg:
        for poly in seg:
            if not _finite_numbers(poly):
                return "polygon with non-numeric or non-finite coordinates"
            if len(poly) % 2:
                return f"polygon with an odd number of coordinates ({len(poly)})"
            if len(poly) < 6:
                return f"polygon with fewer than 3 points ({len(poly) // 2})"
        return None
    return "no polygon or RLE"


class CocoInstancesDataset(RecordDataset):
    """Detection records (boxes, labels, masks) of the images of a COCO instances file.

    Args:
        ann_file: the ``instances_*.json`` file.
        image_root: folder the ``file_name`` of each image is relative to.
        skip: the bad-record policy and counter; a fresh non-strict counter if None.
        skip_empty: leave out (and count as ``"no annotations"``) images without a usable annotation;
            evaluation passes False and gets such images with zero boxes.
        with_masks: decode the instance masks (needs pycocotools); False gives boxes and labels only.
        loader: image loader (``load_image`` by default; must raise ``ImageLoadError`` on bad files).

    Records: ``image`` (PIL RGB), ``image_id`` (int), ``boxes`` (float32 ``(N, 4)``, ``x1, y1, x2, y2`` in
    pixels), ``labels`` (int64 ``(N,)``, 1..K), ``masks`` (uint8 ``(N, H, W)``, only with ``with_masks``),
    ``path``.

    Attributes: ``cat_ids`` (COCO category id of label ``k`` at position ``k - 1``), ``classes`` (their
    names), ``coco`` (the parsed JSON, the ground truth of an evaluation), ``ids`` (image ids in index order).

    Raises:
        FileNotFoundError: if ``ann_file`` does not exist.
        ValueError: if it is not a COCO instances JSON.
        ImportError: with ``with_masks`` and no pycocotools.
    """

    source_name = "coco_instances"

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: str | os.PathLike,
        skip: BadRecordCounter | None = None,
        skip_empty: bool = True,
        with_masks: bool = True,
        *,
        loader: Callable[[str | os.PathLike], Any] = load_image,
    ) -> None:
        super().__init__(None, None, skip, loader)
        ann_file = Path(ann_file)
        if not ann_file.is_file():
            raise FileNotFoundError(f"COCO instances file {ann_file} does not exist")
        if with_masks:
            _mask_api()
        self.source_name = ann_file.name
        self.image_root = Path(image_root)
        self.with_masks = bool(with_masks)
        self.skip_empty = bool(skip_empty)
        try:
            data = json.loads(ann_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{ann_file}: not valid JSON ({err})") from err
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                                 for k in ("images", "annotations", "categories")):
            raise ValueError(f"{ann_file}: expected a COCO instances object with 'images', 'annotations' and "
                             f"'categories' lists")
        self.coco: dict[str, Any] = data
        try:
            cats = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{ann_file}: malformed categories ({err!r})") from err
        self.cat_ids = [c for c, _ in cats]
        self.classes = [n for _, n in cats]
        label_of = {c: k + 1 for k, c in enumerate(self.cat_ids)}

        images: dict[int, dict[str, Any]] = {}
        for n, im in enumerate(data["images"]):
            try:
                image_id = int(im["id"])
                entry = {"image_id": image_id, "path": self.image_root / str(im["file_name"]),
                         "width": int(im["width"]), "height": int(im["height"]),
                         "boxes": [], "labels": [], "segs": []}
            except (KeyError, TypeError, ValueError) as err:
                self.skip.report(self.source_name, f"images[{n}]", "malformed record", repr(err))
                continue
            images[image_id] = entry

        for n, ann in enumerate(data["annotations"]):
            aid = ann.get("id", f"annotations[{n}]") if isinstance(ann, dict) else f"annotations[{n}]"
            if not isinstance(ann, dict):
                self.skip.report(self.source_name, aid, "malformed record", "annotation is not an object")
                continue
            entry = images.get(ann.get("image_id")) if isinstance(ann.get("image_id"), int) else None
            if entry is None:
                self.skip.report(self.source_name, aid, "unknown image", f"image_id {ann.get('image_id')!r}")
                continue
            if ann.get("category_id") not in label_of:
                self.skip.report(self.source_name, aid, "unknown category",
                                 f"category_id {ann.get('category_id')!r}")
                continue
            if ann.get("iscrowd", 0) == 1:
                continue  # crowd regions are not training targets (COCO evaluation reads them from ``coco``)
            box = ann.get("bbox")
            if not _finite_numbers(box) or len(box) != 4:
                self.skip.report(self.source_name, aid, "bad box", f"bbox {box!r}")
                continue
            x, y, w, h = (float(v) for v in box)
            if w <= 0 or h <= 0:
                self.skip.report(self.source_name, aid, "bad box", f"bbox {box!r} has no area")
                continue
            width, height = entry["width"], entry["height"]
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 <= x1 or y2 <= y1:
                self.skip.report(self.source_name, aid, "bad box",
                                 f"bbox {box!r} does not overlap the {width}x{height} image")
                continue
            seg = ann.get("segmentation")
            if seg is not None or self.with_masks:
                problem = _segmentation_problem(seg, height, width)
                if problem is not None:
                    self.skip.report(self.source_name, aid, "bad segmentation", problem)
                    continue
            entry["boxes"].append((x1, y1, x2, y2))
            entry["labels"].append(label_of[ann["category_id"]])
            entry["segs"].append(seg)

        self.records: list[dict[str, Any]] = []
        for image_id in sorted(images):
            entry = images[image_id]
            if not entry["path"].is_file():
                self.skip.report(self.source_name, image_id, "image missing",
                                 f"{entry['path']} does not exist")
                continue
            if self.skip_empty and not entry["boxes"]:
                self.skip.report(self.source_name, image_id, "no annotations")
                continue
            self.records.append(entry)
        self.ids = [e["image_id"] for e in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def _masks(self, segs: list[Any], height: int, width: int) -> torch.Tensor:
        mask_api = _mask_api()
        out = np.zeros((len(segs), height, width), dtype=np.uint8)
        for k, seg in enumerate(segs):
            if isinstance(seg, dict) and isinstance(seg["counts"], (str, bytes)):
                rle = seg  # compressed RLE
            elif isinstance(seg, dict):
                rle = mask_api.frPyObjects(seg, height, width)
            else:
                polygons = [[float(v) for v in poly] for poly in seg]
                rle = mask_api.merge(mask_api.frPyObjects(polygons, height, width))
            with warnings.catch_warnings():  # pycocotools' own NumPy 2 DeprecationWarning (__array__ copy=)
                warnings.filterwarnings("ignore", message=r".*__array__ implementation", category=DeprecationWarning)
                out[k] = mask_api.decode(rle)
        return torch.from_numpy(out)

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedRecord:
        entry = self.records[i]
        image_id = entry["image_id"]
        img = self._image(entry["path"], image_id)
        if isinstance(img, SkippedRecord):
            return img
        width, height = entry["width"], entry["height"]
        if img.size != (width, height):
            return self.skip.report(self.source_name, image_id, "image size mismatch",
                                    f"file {img.size[0]}x{img.size[1]}, annotations {width}x{height}")
        rec: dict[str, Any] = {
            "image": img,
            "image_id": image_id,
            "boxes": torch.tensor(entry["boxes"], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(entry["labels"], dtype=torch.int64).reshape(-1),
            "path": str(entry["path"]),
        }
        if self.with_masks:
            rec["masks"] = self._masks(entry["segs"], height, width)
        return rec
