"""``coco_detection``: object detection and instance segmentation with Mask R-CNN (``BEiT3ForDetection``).

* data: COCO instances JSON with its images: ``DIR/annotations/instances_{train2017,val2017}.json`` with
  ``DIR/{train2017,val2017}/`` (test = val2017), ``DIR/annotations/instances_{train,val,test}.json`` with images
  under ``DIR``, or the world's ``DIR/coco/annotations/instances_{train,val,test}.json``; read by
  :class:`imglish.data.CocoInstancesDataset` (boxes, polygons, RLE; bad boxes and polygons dropped and counted);
  category ids map to the contiguous labels 1..K (0 is the background);
* training (ViTDet's recipe): large-scale jitter, i.e. the image rescaled so that it fits an ``img_size`` square
  times ``U(scale_range)`` (recipe 0.1-2), a random ``img_size`` crop (padded when smaller), horizontal flip;
  boxes and masks follow, instances left empty by the crop are dropped; loss: the sum of Mask R-CNN's five losses
  (RPN objectness and box, RoI class, box and mask);
* evaluation: the image as it is (the model's transform fits its longer side to ``img_size``); detections in COCO
  results format scored with pycocotools ``COCOeval``: ``bbox_AP``, ``bbox_AP50``, ..., ``segm_AP``, ...

The predictions file is ``{"image_ids": [...], "results": [COCO results]}``; a plain COCO results list (anybody's
detector) is scored against every image of the split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imglish.tasks.base import STREAM, Task, register_task

__all__ = ["CocoDetectionTask"]

_COCO2017 = {"train": "train2017", "val": "val2017", "test": "val2017"}


@register_task
class CocoDetectionTask(Task):
    """COCO-style detection and instance segmentation (see the module docstring)."""

    name = "coco_detection"
    model_task = "detection"
    transform_task = "retrieval"  # the saved processor's normalisation; the model's transform does the rest
    terms = ("det",)
    uses_text = False
    main_metric = "bbox_AP"

    # ----------------------------------------------------------------------------------------- data
    def _files(self, split: str) -> tuple[Path, Path]:
        root = Path(self.data_dir)
        cands = [
            (root / "coco" / "annotations" / f"instances_{split}.json", root / "coco"),
            (root / "annotations" / f"instances_{split}.json", root),
            (root / "annotations" / f"instances_{_COCO2017[split]}.json", root / _COCO2017[split]),
        ]
        for ann, images in cands:
            if ann.is_file():
                return ann, images
        raise FileNotFoundError(
            f"no {split} split for coco_detection under {str(root)!r}: expected annotations/instances_"
            f"{_COCO2017[split]}.json with {_COCO2017[split]}/, annotations/instances_{split}.json, or "
            f"coco/annotations/instances_{split}.json (a world from `imglish data shapes`)"
        )

    def dataset(self, split: str, skip: Any, train: bool | None = None) -> Sequence[Any]:
        self.check_split(split)
        from imglish.data import CocoInstancesDataset

        ann, images = self._files(split)
        train = split == "train" if train is None else train
        ds = CocoInstancesDataset(ann, images, skip=skip, skip_empty=train)
        if "classes" not in self.state:
            self.state["classes"] = list(ds.classes)
            self.state["cat_ids"] = [int(c) for c in ds.cat_ids]
        return ds

    def _meta(self) -> None:
        if "classes" not in self.state:
            self.dataset("train", None)

    @property
    def classes(self) -> list[str]:
        self._meta()
        return self.state["classes"]

    @property
    def cat_ids(self) -> list[int]:
        self._meta()
        return self.state["cat_ids"]

    def eval_sets(self, split: str, skip: Any) -> dict[str, Sequence[Any]]:
        return {"records": self.dataset(split, skip, train=False)}

    def sample(self, record: Any, seed: int | None, train: bool) -> dict[str, Any]:
        from torchvision.transforms.v2 import functional as TF

        image = TF.pil_to_tensor(record["image"].convert("RGB"))
        if not train:
            return {"image": image.float().div_(255.0), "image_id": int(record["image_id"])}
        rng = np.random.default_rng(seed)
        size = int(self.cfg.model.img_size)
        boxes = torch.as_tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(record["labels"], dtype=torch.int64).reshape(-1)
        masks = record.get("masks")
        masks = torch.as_tensor(masks, dtype=torch.uint8) if masks is not None else None
        h, w = image.shape[-2:]
        lo, hi = self.cfg.task.scale_range
        scale = float(rng.uniform(lo, hi)) * min(size / h, size / w)
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        image = TF.resize(image, [nh, nw], antialias=True)
        boxes = boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        if masks is not None and len(masks):
            masks = F.interpolate(masks[:, None].float(), size=(nh, nw), mode="nearest")[:, 0].to(torch.uint8)
        elif masks is not None:
            masks = masks.new_zeros((0, nh, nw))
        y = int(rng.integers(0, max(nh - size, 0) + 1))
        x = int(rng.integers(0, max(nw - size, 0) + 1))
        image = image[:, y : y + size, x : x + size]
        boxes = boxes - torch.tensor([x, y, x, y], dtype=torch.float32)
        ch, cw = image.shape[-2:]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
        if masks is not None:
            masks = masks[:, y : y + size, x : x + size]
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        if masks is not None and len(masks):
            keep &= masks.flatten(1).bool().any(1)
        boxes, labels = boxes[keep], labels[keep]
        masks = masks[keep] if masks is not None else None
        image = F.pad(image, (0, size - cw, 0, size - ch))
        if masks is not None:
            masks = F.pad(masks, (0, size - cw, 0, size - ch))
        if rng.random() < 0.5:
            image = image.flip(-1)
            boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], dim=1)
            masks = masks.flip(-1) if masks is not None else None
        target = {"boxes": boxes, "labels": labels}
        if masks is not None:
            target["masks"] = masks
        return {"image": image.float().div_(255.0), "target": target}

    # ----------------------------------------------------------------------------------------- model and loss
    def model_kwargs(self) -> dict[str, Any]:
        size = int(self.cfg.model.img_size)
        c = self.cfg.task.head_channels or 256
        anchors = self.cfg.task.anchor_sizes or tuple(max(2, round(a * size / 1024)) for a in (32, 64, 128, 256, 512))
        return {
            "num_classes": len(self.classes) + 1, "fpn_channels": c, "box_head_dim": 4 * c, "mask_head_dim": c,
            "min_size": size, "max_size": size, "anchor_sizes": list(anchors),
            "box_score_thresh": self.cfg.task.box_score_thresh,
            "rpn_proposals": self.cfg.task.rpn_proposals, "roi_batch": self.cfg.task.roi_batch,
        }

    def count_targets(self, batch: Mapping[str, Mapping[str, Any]], step: int) -> dict[str, int]:
        return {"det": len(batch[STREAM]["image"])}

    def loss_terms(
        self, model: nn.Module, batch: Mapping[str, Any], step: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        images = batch["image"]
        losses = model(list(images), list(batch["target"]))
        total = sum(v.float() for v in losses.values())
        return {"det": (total * len(images), None)}

    # ----------------------------------------------------------------------------------------- evaluation
    def predict(self, model: nn.Module, set_name: str, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        from imglish.evaluation.dense import detections_to_coco

        images = [img.float() for img in batch["image"]]
        detections = model(images)
        out = []
        for pos, image_id, det in zip(batch["index"].tolist(), [int(i) for i in batch["image_id"]], detections):
            res = detections_to_coco(
                int(image_id), det["boxes"].float().cpu(), det["scores"].float().cpu(), det["labels"].cpu(),
                det["masks"].float().cpu() if "masks" in det else None, cat_ids=self.cat_ids,
            )
            out.append({"index": pos, "image_id": int(image_id), "results": res})
        return out

    def predictions(self, records: Mapping[str, list[dict[str, Any]]], split: str) -> dict[str, Any]:
        recs = records["records"]
        return {"format": "imglish-detection/1", "image_ids": [r["image_id"] for r in recs],
                "results": [d for r in recs for d in r["results"]]}

    def ground_truth(self, split: str, skip: Any) -> dict[str, Any]:
        return self.dataset(split, skip, train=False).coco

    def score(self, predictions: Any, ground_truth: Mapping[str, Any], allow_missing: bool = False) -> dict[str, float]:
        from imglish.evaluation.dense import coco_evaluate

        if isinstance(predictions, Mapping):
            results, ids = list(predictions.get("results", [])), predictions.get("image_ids")
        elif isinstance(predictions, list):
            results, ids = predictions, None
        else:
            raise ValueError(f"{self.name}: predictions must be a COCO results list or a dict with 'results'")
        gt = dict(ground_truth)
        known = {int(im["id"]) for im in gt.get("images", [])}
        if ids is not None:
            ids = {int(i) for i in ids}
            unknown = ids - known
            if unknown:
                raise ValueError(f"{self.name}: predictions for unknown image id {min(unknown)}")
            missing = known - ids
            if missing and not allow_missing:
                raise ValueError(f"{self.name}: {len(missing)} images were not evaluated, e.g. id {min(missing)}")
            if missing:  # skipped as unusable: score the images that were evaluated
                gt["images"] = [im for im in gt["images"] if int(im["id"]) in ids]
                gt["annotations"] = [a for a in gt.get("annotations", []) if int(a["image_id"]) in ids]
        if not gt.get("images"):
            raise ValueError(f"{self.name}: nothing to score (no image)")
        with_masks = any("segmentation" in r for r in results) or not results
        types = ("bbox", "segm") if with_masks else ("bbox",)
        return coco_evaluate(gt, results, iou_types=types)
