"""Data for imglish: the embedded synthetic world, readers of the real dataset formats, masking and batching.

See ``docs/data.md`` for the on-disk layout and the reader API.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name loads its module on first use: `generate_world` needs no torch, the readers do.
_EXPORTS: dict[str, str] = {
    "ADE20KDataset": "imglish.data.ade20k",
    "BadRecordCounter": "imglish.data.skip",
    "BadRecordError": "imglish.data.skip",
    "BlockMaskGenerator": "imglish.data.masking",
    "CocoInstancesDataset": "imglish.data.coco_instances",
    "Collator": "imglish.data.collate",
    "Flickr30kCaptions": "imglish.data.flickr",
    "ImageFolderDataset": "imglish.data.imagenet",
    "ImageOnlyDataset": "imglish.data.imagenet",
    "KarpathyCaptions": "imglish.data.coco",
    "NLVR2Dataset": "imglish.data.nlvr2",
    "OFFICIAL_TASKS": "imglish.data.official",
    "OfficialIndexDataset": "imglish.data.official",
    "SkippedRecord": "imglish.data.skip",
    "TextCorpus": "imglish.data.text",
    "VQAv2Dataset": "imglish.data.vqav2",
    "WdsStream": "imglish.data.wds",
    "WorldConfig": "imglish.data.synthetic",
    "answer_scores": "imglish.data.vqav2",
    "build_answer_vocab": "imglish.data.vqav2",
    "caption_mask_count": "imglish.data.masking",
    "collate_records": "imglish.data.collate",
    "generate_world": "imglish.data.synthetic",
    "karpathy_caption_gt": "imglish.data.coco",
    "load_answer_vocab": "imglish.data.vqav2",
    "load_answer2label": "imglish.data.official",
    "load_caption_gt": "imglish.data.coco",
    "load_world": "imglish.data.synthetic",
    "mask_caption": "imglish.data.masking",
    "mask_text": "imglish.data.masking",
    "nlvr2_image_paths": "imglish.data.nlvr2",
    "normalize_answer": "imglish.data.vqav2",
    "official_index_files": "imglish.data.official",
    "pad_sequences": "imglish.data.collate",
    "save_answer_vocab": "imglish.data.vqav2",
    "text_segment": "imglish.data.collate",
    "world_paths": "imglish.data.synthetic",
    "write_caption_gt": "imglish.data.coco",
    "write_official_index": "imglish.data.official",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'imglish.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
