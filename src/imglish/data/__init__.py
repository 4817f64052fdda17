"""Data for imglish: the embedded synthetic world, readers of the real dataset formats, masking and batching.

See ``docs/data.md`` for the on-disk layout and the reader API.
"""

from imglish.data.collate import Collator, collate_records, pad_sequences, text_segment
from imglish.data.coco import KarpathyCaptions, karpathy_caption_gt, load_caption_gt, write_caption_gt
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
    "BadRecordCounter", "BadRecordError", "SkippedRecord",
    "BlockMaskGenerator", "mask_text", "mask_caption", "caption_mask_count",
    "Collator", "collate_records", "pad_sequences", "text_segment",
    "KarpathyCaptions", "Flickr30kCaptions", "karpathy_caption_gt", "write_caption_gt", "load_caption_gt",
    "VQAv2Dataset", "normalize_answer", "build_answer_vocab", "answer_scores", "save_answer_vocab",
    "load_answer_vocab",
    "NLVR2Dataset", "nlvr2_image_paths",
    "ImageFolderDataset", "ImageOnlyDataset", "TextCorpus", "WdsStream",
    "WorldConfig", "generate_world", "load_world", "world_paths",
]
