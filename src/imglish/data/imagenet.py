"""Images without text: an ImageNet-style class tree (``<root>/<class>/<file>``) and a plain image folder.

:class:`ImageFolderDataset` gives labels by the sorted order of the class folders, like torchvision's ``ImageFolder``
and the official index files (spec §6); :class:`ImageOnlyDataset` lists every image file under a folder
(recursively) and is the image-only pretraining stream.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imglish.data.base import RecordDataset, Transform
from imglish.data.skip import BadRecordCounter, SkippedRecord
from imglish.tokenizers.image import IMAGE_EXTENSIONS

__all__ = ["ImageFolderDataset", "ImageOnlyDataset", "list_image_files"]


def list_image_files(root: str | os.PathLike) -> list[Path]:
    """Every file under ``root`` (recursive) whose extension is an image extension, sorted; may be empty.

    Raises:
        FileNotFoundError: if ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class ImageFolderDataset(RecordDataset):
    """Classification records from ``<root>/<class name>/**/<image>``.

    Args:
        root: the split folder (e.g. ``imagenet/train``).
        classes: class names in label order; default: the sorted sub-folder names (as torchvision's ImageFolder).
            Pass the training classes when reading val/test so labels agree even if a class folder is empty.
        transform, skip, loader: see :class:`~imglish.data.base.RecordDataset`.

    Records: ``image``, ``label`` (int), ``path`` (str).

    Raises:
        FileNotFoundError: if ``root`` is missing.
        ValueError: if there are no class folders.
    """

    source_name = "imagefolder"

    def __init__(
        self,
        root: str | os.PathLike,
        classes: Sequence[str] | None = None,
        transform: Transform | None = None,
        skip: BadRecordCounter | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(transform, None, skip, **kwargs)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"class folder tree {self.root} does not exist")
        self.source_name = self.root.name
        self.classes = list(classes) if classes is not None else sorted(
            d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"{self.root} has no class sub-folders")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for c in self.classes:
            folder = self.root / c
            if folder.is_dir():
                self.samples.extend((p, self.class_to_idx[c]) for p in list_image_files(folder))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedRecord:
        path, label = self.samples[i]
        img = self._image(path, path.relative_to(self.root))
        if isinstance(img, SkippedRecord):
            return img
        return {"image": img, "label": label, "path": str(path)}


class ImageOnlyDataset(RecordDataset):
    """Every image under a folder (recursively, sorted by path): the image-only stream.

    Args:
        root: a folder (e.g. ``<world>/imagenet/train``; class sub-folders are simply searched).
        transform, skip, loader: see :class:`~imglish.data.base.RecordDataset`.

    Records: ``image``, ``path`` (str), ``index`` (int).

    Raises:
        FileNotFoundError: if ``root`` is missing.
        ValueError: if it holds no image file.
    """

    source_name = "images"

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None,
                 skip: BadRecordCounter | None = None, **kwargs: Any) -> None:
        super().__init__(transform, None, skip, **kwargs)
        self.root = Path(root)
        self.files = list_image_files(self.root)
        if not self.files:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.source_name = self.root.name

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedRecord:
        path = self.files[i]
        img = self._image(path, path.relative_to(self.root))
        if isinstance(img, SkippedRecord):
            return img
        return {"image": img, "path": str(path), "index": i}
