"""Data for imglish: the embedded synthetic world, readers of the real dataset formats, masking and batching.

See ``docs/data.md`` for the on-disk layout and the reader API.
"""

from imglish.data.coco import KarpathyCaptions, karpathy_caption_gt, load_caption_gt, write_caption_gt
from imglish.data.collate import Collator, collate_records, pad_sequences, text_segment
from imglish.data.flickr import Flickr30kCaptions
from imglish.data.imagenet import ImageFolderDataset, ImageOnlyDataset
from imglish.data.masking import BlockMaskGenerator, caption_mask_count, mask_caption, mask_text
from imglish.data.nlvr2 import NLVR2Dataset, nlvr2_image_paths
from imglish.data.skip import BadRecordCounter, BadRecordError, SkippedRecord
from imglish.data.synthetic import WorldConfig, generate_world, load_world, world_paths
from imglish.data.text import TextCorpus
from imglish.data.vqav2 import (
    VQAv2Dataset,
    answer_scores,
    build_answer_vocab,
    load_answer_vocab,
    normalize_answer,
    save_answer_vocab,
)
from imglish.data.wds import WdsStream

__all__ = [
    "BadRecordCounter",
    "BadRecordError",
    "BlockMaskGenerator",
    "Collator",
    "Flickr30kCaptions",
    "ImageFolderDataset",
    "ImageOnlyDataset",
    "KarpathyCaptions",
    "NLVR2Dataset",
    "SkippedRecord",
    "TextCorpus",
    "VQAv2Dataset",
    "WdsStream",
    "WorldConfig",
    "answer_scores",
    "build_answer_vocab",
    "caption_mask_count",
    "collate_records",
    "generate_world",
    "karpathy_caption_gt",
    "load_answer_vocab",
    "load_caption_gt",
    "load_world",
    "mask_caption",
    "mask_text",
    "nlvr2_image_paths",
    "normalize_answer",
    "pad_sequences",
    "save_answer_vocab",
    "text_segment",
    "world_paths",
    "write_caption_gt",
]
