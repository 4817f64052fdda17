"""Flickr30k captions: the Karpathy ``dataset_flickr30k.json`` with images in ``flickr30k-images/``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imglish.data.coco import KarpathyCaptions

__all__ = ["Flickr30kCaptions"]


class Flickr30kCaptions(KarpathyCaptions):
    """:class:`~imglish.data.coco.KarpathyCaptions` with Flickr30k's layout.

    Args:
        json_path: ``dataset_flickr30k.json``.
        image_root: folder holding the images; default ``<json folder>/flickr30k-images`` (entries have no
            ``filepath``, only ``filename``).
        splits: Karpathy splits (``train``, ``val``, ``test``).
        **kwargs: as :class:`KarpathyCaptions` (``per``, ``transform``, ``tokenizer``, ``skip``).
    """

    def __init__(self, json_path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 splits: Sequence[str] = ("train",), **kwargs: Any) -> None:
        if image_root is None:
            image_root = Path(json_path).parent / "flickr30k-images"
        super().__init__(json_path, image_root, splits, **kwargs)
