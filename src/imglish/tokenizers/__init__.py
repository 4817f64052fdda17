"""Tokenizers and processors: text (SentencePiece, XLM-R ids), images (loader, transforms) and VQ-KD."""

from imglish.tokenizers.image import ImageLoadError, find_images, load_image
from imglish.tokenizers.text import TextTokenizer, train_sentencepiece
from imglish.tokenizers.transforms import TransformConfig, build_transform

__all__ = [
    "ImageLoadError",
    "find_images",
    "load_image",
    "TextTokenizer",
    "train_sentencepiece",
    "TransformConfig",
    "build_transform",
]
