"""Evaluation: metrics (:mod:`.metrics`, :mod:`.captions`, :mod:`.dense`), the parity runner (:mod:`.parity`).

The metric functions below load their module on first use, so ``import imglish.evaluation`` imports neither
torch nor any optional package; pycocoevalcap is imported only when the coco caption backend runs, and
pycocotools only by the COCO mask and detection functions of :mod:`.dense`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "accuracy": "imglish.evaluation.metrics",
    "process_digit_article": "imglish.evaluation.metrics",
    "process_punctuation": "imglish.evaluation.metrics",
    "retrieval_recall": "imglish.evaluation.metrics",
    "topk_accuracy": "imglish.evaluation.metrics",
    "vqa_accuracy": "imglish.evaluation.metrics",
    "vqa_scores": "imglish.evaluation.metrics",
    "caption_backend": "imglish.evaluation.captions",
    "caption_scores": "imglish.evaluation.captions",
    "tokenize_caption": "imglish.evaluation.captions",
    "SegmentationMeter": "imglish.evaluation.dense",
    "coco_evaluate": "imglish.evaluation.dense",
    "confusion_matrix": "imglish.evaluation.dense",
    "detections_to_coco": "imglish.evaluation.dense",
    "mask_to_rle": "imglish.evaluation.dense",
    "rle_to_mask": "imglish.evaluation.dense",
    "segmentation_metrics": "imglish.evaluation.dense",
}

__all__ = [
    "SegmentationMeter",
    "accuracy",
    "caption_backend",
    "caption_scores",
    "coco_evaluate",
    "confusion_matrix",
    "detections_to_coco",
    "mask_to_rle",
    "process_digit_article",
    "process_punctuation",
    "retrieval_recall",
    "rle_to_mask",
    "segmentation_metrics",
    "tokenize_caption",
    "topk_accuracy",
    "vqa_accuracy",
    "vqa_scores",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
