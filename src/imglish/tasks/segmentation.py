"""``ade20k``: semantic segmentation with UperNet on the BEiT-3 backbone (``BEiT3ForSemanticSegmentation``).

* data: the ADEChallengeData2016 layout (``DIR/images/{training,validation}/*.jpg`` and
  ``DIR/annotations/{training,validation}/*.png``, label 0 ignored, 150 classes), or the world's ``DIR/ade20k``
  (6 classes: background and the five shape kinds; its test split is ``testing``, ADE20K's test falls back to
  ``validation``); read by :class:`imglish.data.ADE20KDataset`;
* training (BEiT's ADE20K recipe): the shorter side rescaled to ``img_size * U(scale_range)`` (longer side at most
  four times that), a random ``img_size`` crop in which no class covers more than 75% (up to 10 tries), padding with
  the ignore label, horizontal flip, photometric distortion, then the 0.5 mean/std normalisation; loss: per-pixel
  cross-entropy (ignore 255) plus ``aux_weight`` times the FCN auxiliary head's;
* evaluation: the shorter side resized to ``img_size``, sliding windows of ``img_size`` with stride
  ``slide_stride`` (two thirds of the crop by default), averaged logits resized back to the original image;
  ``mIoU`` (mean IoU over the classes seen in the ground truth or the predictions), ``aAcc`` (pixel accuracy),
  ``mAcc`` and per-class IoU, all from the per-class counts summed over the whole split.

The predictions file holds, per image, the non-zero entries of its confusion matrix ``[[gt, pred, pixels], ...]``:
small, exact, and enough for every metric of the split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imglish.tasks.base import Task, register_task

__all__ = ["ADE20KTask", "eval_image", "slide_logits"]

IGNORE = 255
_MEAN = (0.5, 0.5, 0.5)
_STD = (0.5, 0.5, 0.5)


def _resize_shorter(h: int, w: int, short: float, long_cap: float) -> tuple[int, int]:
    """The size whose shorter side is ``short`` and longer side at most ``long_cap`` (aspect kept)."""
    scale = min(short / min(h, w), long_cap / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _normalise(image: torch.Tensor, mean: Sequence[float] = _MEAN, std: Sequence[float] = _STD) -> torch.Tensor:
    """uint8 (3, H, W) -> float, normalised (BEiT-3's mean/std 0.5 by default)."""
    x = image.float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def eval_image(image: Any, crop: int, mean: Sequence[float] = _MEAN, std: Sequence[float] = _STD) -> torch.Tensor:
    """A PIL image as evaluation sees it: the shorter side resized to ``crop`` (the longer at most 4x), normalised;
    the input of :func:`slide_logits` (the ``segment`` pipeline uses it too)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    x = TF.pil_to_tensor(image.convert("RGB"))
    size = _resize_shorter(x.shape[-2], x.shape[-1], crop, 4 * crop)
    return _normalise(TF.resize(x, list(size), InterpolationMode.BILINEAR, antialias=True), mean, std)


def slide_logits(model: nn.Module, image: torch.Tensor, crop: int, stride: int, num_classes: int,
                 batch_size: int = 8) -> torch.Tensor:
    """Logits (C, H, W) of one normalised image (3, H, W) by sliding ``crop`` windows with ``stride``.

    Windows that overlap are averaged; each window is padded to a multiple of the patch size (and its padding cut
    from the logits); windows are batched ``batch_size`` at a time.
    """
    _, h, w = image.shape
    patch = int(model.config.patch_size)
    rows = max(math.ceil((h - crop) / stride), 0) + 1
    cols = max(math.ceil((w - crop) / stride), 0) + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            boxes.append((y1, y2, x1, x2))
    ch, cw = min(crop, h), min(crop, w)
    ph, pw = math.ceil(ch / patch) * patch, math.ceil(cw / patch) * patch
    total = image.new_zeros((num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, h, w), dtype=torch.float32)
    for k in range(0, len(boxes), batch_size):
        part = boxes[k : k + batch_size]
        tiles = torch.stack([F.pad(image[:, y1:y2, x1:x2], (0, pw - (x2 - x1), 0, ph - (y2 - y1)))
                             for y1, y2, x1, x2 in part])
        logits = model(tiles).float()
        for (y1, y2, x1, x2), lo in zip(part, logits):
            total[:, y1:y2, x1:x2] += lo[:, : y2 - y1, : x2 - x1]
            count[:, y1:y2, x1:x2] += 1
    return total / count


@register_task
class ADE20KTask(Task):
    """ADE20K-style semantic segmentation (see the module docstring)."""

    name = "ade20k"
    model_task = "segmentation"
    transform_task = "retrieval"  # the saved processor's normalisation (0.5); the geometry is the task's own
    terms = ("seg",)
    uses_text = False
    main_metric = "mIoU"

    # ----------------------------------------------------------------------------------------- data
    def _root(self) -> Path:
        root = Path(self.data_dir)
        for cand in (root / "ade20k", root / "ADEChallengeData2016", root):
            if (cand / "images").is_dir() and (cand / "annotations").is_dir():
                return cand
        raise FileNotFoundError(
            f"no ADE20K data under {str(root)!r}: expected images/{{training,validation}}/*.jpg and "
            f"annotations/{{training,validation}}/*.png there, in ADEChallengeData2016/ or in ade20k/ (a world from "
            f"`imglish data shapes`)"
        )

    def _folder(self, split: str) -> str:
        from imglish.data.ade20k import ADE20K_SPLITS

        folder = ADE20K_SPLITS[split]
        if split == "test" and not (self._root() / "images" / folder).is_dir():
            return "validation"  # ADE20K's test images have no public labels: test = val, as for imagenet
        return folder

    @property
    def classes(self) -> list[str]:
        """Class names of the reduced ids 0..C-1 (``classes.json`` next to the data; else ADE20K's 150 ids)."""
        if "classes" not in self.state:
            path = self._root() / "classes.json"
            if path.is_file():
                self.state["classes"] = [str(c) for c in json.loads(path.read_text())]
            else:
                self.state["classes"] = [str(i) for i in range(150)]
        return self.state["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def dataset(self, split: str, skip: Any) -> Sequence[Any]:
        self.check_split(split)
        from imglish.data import ADE20KDataset

        return ADE20KDataset(self._root(), self._folder(split), skip=skip, num_classes=self.num_classes)

    def _crop_size(self) -> int:
        return int(self.cfg.model.img_size)

    def sample(self, record: Any, seed: int | None, train: bool) -> dict[str, Any]:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        label = torch.as_tensor(np.asarray(record["label"]), dtype=torch.uint8)
        if tuple(label.shape) != tuple(record["image"].size[::-1]):
            raise ValueError(f"label {tuple(label.shape)} and image {record['image'].size[::-1]} differ in size")
        crop = self._crop_size()
        if not train:
            return {"image": eval_image(record["image"], crop), "label": label.long(),
                    "id": str(record.get("id", ""))}
        image = TF.pil_to_tensor(record["image"].convert("RGB"))
        h, w = image.shape[-2:]
        rng = np.random.default_rng(seed)
        lo, hi = self.cfg.task.scale_range
        r = float(rng.uniform(lo, hi))
        size = _resize_shorter(h, w, crop * r, 4 * crop * r)
        image = TF.resize(image, list(size), InterpolationMode.BILINEAR, antialias=True)
        label = TF.resize(label[None], list(size), InterpolationMode.NEAREST)[0]
        image, label = self._random_crop(image, label, crop, rng)
        pad_h, pad_w = crop - image.shape[-2], crop - image.shape[-1]
        if pad_h > 0 or pad_w > 0:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE)
        if rng.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        if self.cfg.task.photometric:
            image = self._photometric(image, rng)
        return {"image": _normalise(image), "label": label.long()}

    @staticmethod
    def _random_crop(image: torch.Tensor, label: torch.Tensor, crop: int, rng: np.random.Generator,
                     cat_max_ratio: float = 0.75, tries: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = label.shape
        ch, cw = min(crop, h), min(crop, w)
        for _ in range(tries):
            y = int(rng.integers(0, h - ch + 1))
            x = int(rng.integers(0, w - cw + 1))
            part = label[y : y + ch, x : x + cw]
            counts = torch.bincount(part[part != IGNORE].flatten().long())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio:
                break
        return image[:, y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]

    @staticmethod
    def _photometric(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Brightness (+-32), contrast and saturation (x0.5-1.5) and hue (+-18 degrees), each with probability
        one half, as BEiT's segmentation pipeline does."""
        from torchvision.transforms.v2 import functional as TF

        x = image.float()
        if rng.random() < 0.5:
            x = x + float(rng.uniform(-32, 32))
        x = x.clamp(0, 255)
        if rng.random() < 0.5:
            x = TF.adjust_contrast(x / 255.0, float(rng.uniform(0.5, 1.5))) * 255.0
        if rng.random() < 0.5:
            x = TF.adjust_saturation(x / 255.0, float(rng.uniform(0.5, 1.5))) * 255.0
        if rng.random() < 0.5:
            x = TF.adjust_hue(x / 255.0, float(rng.uniform(-18, 18)) / 360.0) * 255.0
        return x.clamp(0, 255).round().to(torch.uint8)

    # ----------------------------------------------------------------------------------------- model and loss
    def model_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"num_classes": self.num_classes}
        if self.cfg.task.head_channels:
            kw["channels"] = self.cfg.task.head_channels
            kw["aux_channels"] = max(self.cfg.task.head_channels // 3, 8)
        if self.cfg.task.aux_weight == 0:
            kw["aux_channels"] = 0
        return kw

    def count_targets(self, batch: Mapping[str, Mapping[str, torch.Tensor]], step: int) -> dict[str, int]:
        from imglish.tasks.base import STREAM

        return {"seg": int((batch[STREAM]["label"] != IGNORE).sum())}

    def loss_terms(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], step: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        label = batch["label"]
        logits, aux = model(batch["image"], return_aux=True)
        loss = F.cross_entropy(logits.float(), label, ignore_index=IGNORE, reduction="sum")
        if aux is not None and self.cfg.task.aux_weight > 0:
            aux_loss = F.cross_entropy(aux.float(), label, ignore_index=IGNORE, reduction="sum")
            loss = loss + self.cfg.task.aux_weight * aux_loss
        valid = label != IGNORE
        correct = ((logits.detach().argmax(1) == label) & valid).sum()
        return {"seg": (loss, correct)}

    # ----------------------------------------------------------------------------------------- evaluation
    def segment(self, model: nn.Module, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits (C, H, W) at the original ``size`` of one resized, normalised image (sliding windows)."""
        crop = self._crop_size()
        stride = self.cfg.task.slide_stride or max(1, (2 * crop) // 3)
        logits = slide_logits(model, image, crop, stride, self.num_classes, self.cfg.task.eval_batch_size)
        return F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]

    def predict(self, model: nn.Module, set_name: str, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        from imglish.evaluation.dense import confusion_matrix

        out = []
        for k, pos in enumerate(batch["index"].tolist()):
            image, label = batch["image"][k], batch["label"][k]
            pred = self.segment(model, image, tuple(label.shape)).argmax(0)
            m = confusion_matrix(pred, label, self.num_classes, ignore_index=IGNORE).cpu()
            nz = m.nonzero().tolist()
            out.append({"index": pos, "id": batch["id"][k],
                        "confusion": [[g, p, int(m[g, p])] for g, p in nz]})
        return out

    def predictions(self, records: Mapping[str, list[dict[str, Any]]], split: str) -> dict[str, Any]:
        return {
            "format": "imglish-segmentation/1",
            "classes": self.classes,
            "images": [{"id": r["id"], "confusion": r["confusion"]} for r in records["records"]],
        }

    def ground_truth(self, split: str, skip: Any) -> dict[str, Any]:
        return {"ids": list(self.dataset(split, skip).ids), "classes": self.classes}

    def score(self, predictions: Any, ground_truth: Mapping[str, Any], allow_missing: bool = False) -> dict[str, float]:
        from imglish.evaluation.dense import segmentation_metrics

        if not isinstance(predictions, Mapping) or "images" not in predictions:
            raise ValueError(f"{self.name}: a predictions file is a dict with 'images' (per-image confusion entries)")
        n = len(ground_truth["classes"])
        known = set(ground_truth["ids"])
        seen = set()
        matrix = torch.zeros(n, n, dtype=torch.int64)
        for item in predictions["images"]:
            key = str(item["id"])
            if key not in known:
                raise ValueError(f"{self.name}: prediction for unknown image {key!r}")
            seen.add(key)
            for g, p, c in item["confusion"]:
                if not (0 <= int(g) < n and 0 <= int(p) < n):
                    raise ValueError(f"{self.name}: image {key!r}: class id out of range 0..{n - 1}: {[g, p]}")
                matrix[int(g), int(p)] += int(c)
        missing = known - seen
        if missing and not allow_missing:
            raise ValueError(f"{self.name}: {len(missing)} images have no prediction, e.g. {min(missing)!r}")
        if not seen:
            raise ValueError(f"{self.name}: nothing to score (no prediction)")
        return segmentation_metrics(matrix, class_names=ground_truth["classes"])
