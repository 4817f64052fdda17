"""Dense pipelines (``segment``, ``detect``) and the overlays ``imglish predict segment|detect --out`` draws.

=========  ============  =======================================================================================
task       model         one image gives
=========  ============  =======================================================================================
segment    segmentation  ``{"label_map": (H, W) int64 tensor, "segments": [{"label", "id", "fraction"}]}``, the
                         classes present, largest first (sliding windows at the model's size, as in evaluation)
detect     detection     ``[{"label", "score", "box": {"xmin", "ymin", "xmax", "ymax"}, "mask"?}]`` above
                         ``threshold`` (default 0.5), best first; ``mask`` an (H, W) bool tensor (Mask R-CNN)
=========  ============  =======================================================================================

Both keep each image at its own size (no stacking), answer in the input image's pixel coordinates, and read the
class names from the ``task.json`` beside the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from imglish.inference.inputs import InputError, to_image
from imglish.inference.pipeline import Pipeline, _is_batch

__all__ = ["DetectPipeline", "SegmentPipeline", "detection_overlay", "palette", "segmentation_overlay"]


def palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours (uint8, (n, 3)), the same for every call."""
    rng = np.random.default_rng(1234)
    base = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.uint8)
    if n <= len(base):
        return base[:n]
    return np.concatenate([base, rng.integers(0, 256, (n - len(base), 3), dtype=np.uint8)])


def segmentation_overlay(image: Image.Image, label_map: torch.Tensor | np.ndarray, alpha: float = 0.5,
                         skip: Sequence[int] = ()) -> Image.Image:
    """The image with each class painted in its colour at ``alpha`` (classes in ``skip`` left unpainted)."""
    labels = np.asarray(label_map, dtype=np.int64)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"label map {labels.shape} and image {rgb.shape[:2]} differ in size")
    colours = palette(int(labels.max()) + 1 if labels.size else 1).astype(np.float32)
    paint = np.ones(labels.shape, bool)
    for k in skip:
        paint &= labels != k
    out = rgb.copy()
    out[paint] = (1 - alpha) * rgb[paint] + alpha * colours[labels[paint]]
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def detection_overlay(image: Image.Image, detections: Sequence[Mapping[str, Any]], alpha: float = 0.45) -> Image.Image:
    """The image with each detection's mask (if any) tinted, its box drawn and ``label score`` written."""
    out = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    names = sorted({str(d["label"]) for d in detections})
    colours = palette(max(len(names), 1))
    colour = {name: colours[i] for i, name in enumerate(names)}
    for d in detections:
        if d.get("mask") is not None:
            m = np.asarray(d["mask"], dtype=bool)
            out[m] = (1 - alpha) * out[m] + alpha * colour[str(d["label"])].astype(np.float32)
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for d in detections:
        b = d["box"]
        c = tuple(int(v) for v in colour[str(d["label"])])
        draw.rectangle([b["xmin"], b["ymin"], b["xmax"], b["ymax"]], outline=c, width=max(1, img.width // 160))
        draw.text((b["xmin"] + 2, b["ymin"] + 1), f"{d['label']} {d['score']:.2f}", fill=c)
    return img


class _DensePipeline(Pipeline):
    uses_text = False
    image_only = True

    def load(self, item: Any) -> Image.Image:
        return to_image(item, max_pixels=self.max_pixels)

    @staticmethod
    def collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {k: [r[k] for r in rows] for k in rows[0]}


class SegmentPipeline(_DensePipeline):
    """Semantic segmentation (an ``ade20k`` fine-tune): ``pipe(images)``."""

    task = "segment"
    model_tasks = ("segmentation",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check_labels(self.model.num_classes, "class names")

    def preprocess(self, example: Mapping[str, Any]) -> dict[str, Any]:
        from imglish.tasks.segmentation import eval_image

        img = self.load(example["image"])
        cfg = self.processor.transform_config
        x = eval_image(img, int(self.model.config.img_size[0]), cfg.mean, cfg.std)
        return {"image": x, "size": (img.height, img.width)}

    @torch.no_grad()
    def forward(self, batch: Mapping[str, Any], **params: Any) -> list[torch.Tensor]:
        from imglish.tasks.segmentation import slide_logits

        crop = int(self.model.config.img_size[0])
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        out = []
        for image, size in zip(batch["image"], batch["size"]):
            logits = slide_logits(self.model, image.to(self.device, dtype), crop, max(1, 2 * crop // 3),
                                  self.model.num_classes, self.batch_size)
            logits = F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
            out.append(logits.argmax(0).cpu())
        return out

    def postprocess(self, raw: torch.Tensor, **params: Any) -> dict[str, Any]:
        counts = torch.bincount(raw.flatten(), minlength=self.model.num_classes)
        total = max(int(raw.numel()), 1)
        order = [int(k) for k in counts.argsort(descending=True) if counts[k] > 0]
        segments = [{"label": self._label(k), "id": k, "fraction": float(counts[k]) / total} for k in order]
        return {"label_map": raw, "segments": segments}

    def __call__(self, images: Any, **kw: Any) -> Any:
        items = list(images) if _is_batch(images) else [images]
        out = self.run([{"image": x} for x in items], **kw)
        return out if _is_batch(images) else out[0]


class DetectPipeline(_DensePipeline):
    """Object detection and instance segmentation (a ``coco_detection`` fine-tune): ``pipe(images, threshold=0.5)``."""

    task = "detect"
    model_tasks = ("detection",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("precision", "fp32") == "bf16":
            raise ValueError("the detect pipeline runs in fp32 (torchvision's RoI ops have no bf16 CPU kernels)")
        super().__init__(*args, **kwargs)
        self._check_labels(self.model.num_classes - 1, "class names")

    def check_params(self, threshold: Any = 0.5, top_k: Any = None) -> dict[str, Any]:
        try:
            t = float(threshold)
        except (TypeError, ValueError):
            raise InputError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
        if not 0.0 <= t <= 1.0:
            raise InputError(f"threshold must be a number in [0, 1], got {threshold!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise InputError(f"top_k must be a positive integer, got {top_k!r}")
        return {"threshold": t, "top_k": top_k}

    def preprocess(self, example: Mapping[str, Any]) -> dict[str, Any]:
        from torchvision.transforms.v2 import functional as TF

        img = self.load(example["image"])
        return {"image": TF.pil_to_tensor(img.convert("RGB")).float() / 255.0}

    @torch.no_grad()
    def forward(self, batch: Mapping[str, Any], **params: Any) -> list[dict[str, torch.Tensor]]:
        dets = self.model([x.to(self.device) for x in batch["image"]])
        return [{k: v.cpu() for k, v in d.items()} for d in dets]

    def postprocess(self, raw: Mapping[str, torch.Tensor], threshold: float = 0.5,
                    top_k: int | None = None) -> list[dict[str, Any]]:
        keep = (raw["scores"] >= threshold).nonzero().flatten().tolist()
        keep = sorted(keep, key=lambda i: -float(raw["scores"][i]))[: top_k or None]
        out = []
        for i in keep:
            x1, y1, x2, y2 = (float(v) for v in raw["boxes"][i])
            row: dict[str, Any] = {"label": self._label(int(raw["labels"][i]) - 1), "score": float(raw["scores"][i]),
                                   "box": {"xmin": x1, "ymin": y1, "xmax": x2, "ymax": y2}}
            if "masks" in raw:
                row["mask"] = raw["masks"][i, 0] >= 0.5
            out.append(row)
        return out

    def __call__(self, images: Any, threshold: float = 0.5, **kw: Any) -> Any:
        items = list(images) if _is_batch(images) else [images]
        out = self.run([{"image": x} for x in items], threshold=threshold, **kw)
        return out if _is_batch(images) else out[0]
