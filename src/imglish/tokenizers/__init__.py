"""Tokenizers and processors: text (SentencePiece, XLM-R ids), images (loader, transforms), VQ-KD, Processor."""

from imglish.tokenizers.image import ImageLoadError, find_images, load_image
from imglish.tokenizers.processor import Processor
from imglish.tokenizers.text import TextTokenizer, train_sentencepiece
from imglish.tokenizers.transforms import TransformConfig, build_transform
from imglish.tokenizers.vqkd import VQKD, VQKDConfig, create_vqkd, list_vqkd_models, load_vqkd, save_vqkd

__all__ = [
    "ImageLoadError",
    "find_images",
    "load_image",
    "Processor",
    "TextTokenizer",
    "train_sentencepiece",
    "TransformConfig",
    "build_transform",
    "VQKD",
    "VQKDConfig",
    "create_vqkd",
    "list_vqkd_models",
    "load_vqkd",
    "save_vqkd",
]
