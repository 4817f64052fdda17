"""Semantic segmentation in the ADE20K layout (``ADEChallengeData2016``): images and label maps.

A root folder holds ``images/<split>/<name>.jpg`` and ``annotations/<split>/<name>.png`` with ``<split>`` one
of ``training``, ``validation`` (and ``testing`` in the synthetic world). A label map stores one class value
per pixel; ADE20K keeps 0 for "unlabelled" and numbers the real classes from 1. With ``reduce_zero_label``
(the convention of the segmentation codebases) raw 0 becomes the ignore value 255 and every other value ``v``
becomes ``v - 1``, so the classes are 0..C-1.

Bad records follow :mod:`imglish.data.skip`: an image without its label map never enters the index (counted
as ``"no annotation"``); a label map of another size than its image, or a file that cannot be read, makes
``dataset[i]`` a :class:`~imglish.data.skip.SkippedRecord`; label values outside ``num_classes`` are set to
the ignore value and counted (``"label id out of range"``) while the record is still returned.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imglish.data.base import RecordDataset
from imglish.data.skip import BadRecordCounter, SkippedRecord
from imglish.tokenizers.image import IMAGE_EXTENSIONS, load_image

__all__ = ["ADE20K_SPLITS", "IGNORE_INDEX", "ADE20KDataset"]

#: value of ignored pixels in the returned label maps
IGNORE_INDEX = 255

#: split folder names, with the short aliases that map to them
ADE20K_SPLITS = {"training": "training", "validation": "validation", "testing": "testing",
                 "train": "training", "val": "validation", "test": "testing"}

_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


class ADE20KDataset(RecordDataset):
    """Image and label-map records of one split of an ADEChallengeData2016-style folder.

    Args:
        root: the folder holding ``images/`` and ``annotations/``.
        split: ``training``, ``validation`` or ``testing`` (``train``, ``val``, ``test`` are accepted too).
        skip: the bad-record policy and counter; a fresh non-strict counter if None.
        reduce_zero_label: map raw 0 to 255 (ignored) and ``v`` to ``v - 1`` (ADE20K convention). False keeps
            the raw values (255 stays the ignore value).
        num_classes: if given, values ``>= num_classes`` (after the reduction; 255 excepted) become 255 and
            the record is counted as ``"label id out of range"``.
        loader: image loader (``load_image`` by default; must raise ``ImageLoadError`` on bad files).

    Records: ``image`` (PIL RGB), ``label`` (numpy uint8, ``(H, W)``), ``path`` (the image path), ``id``
    (the file stem). Attributes: ``ids`` (stems in index order), ``samples`` (``(image, label)`` paths),
    ``classes`` (the names in ``root/classes.json`` if that file exists, else None).

    Raises:
        FileNotFoundError: if ``images/<split>`` or ``annotations/<split>`` is missing.
        ValueError: on an unknown split name.
    """

    source_name = "ade20k"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        skip: BadRecordCounter | None = None,
        reduce_zero_label: bool = True,
        num_classes: int | None = None,
        *,
        loader: Callable[[str | os.PathLike], Any] = load_image,
    ) -> None:
        super().__init__(None, None, skip, loader)
        if split not in ADE20K_SPLITS:
            raise ValueError(f"unknown ADE20K split {split!r}; expected one of {sorted(set(ADE20K_SPLITS))}")
        if num_classes is not None and not 1 <= int(num_classes) <= IGNORE_INDEX:
            raise ValueError(f"num_classes must be in [1, {IGNORE_INDEX}], got {num_classes}")
        self.root = Path(root)
        self.split = ADE20K_SPLITS[split]
        self.reduce_zero_label = bool(reduce_zero_label)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.source_name = f"ade20k/{self.split}"
        image_dir = self.root / "images" / self.split
        label_dir = self.root / "annotations" / self.split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{folder} does not exist: an ADE20K root holds images/{self.split}/*.jpg and "
                    f"annotations/{self.split}/*.png (ADEChallengeData2016 layout; a world from "
                    f"`imglish data shapes` has it under <world>/ade20k)"
                )
        classes_file = self.root / "classes.json"
        self.classes: list[str] | None = None
        if classes_file.is_file():
            self.classes = [str(c) for c in json.loads(classes_file.read_text())]
        self.samples: list[tuple[Path, Path]] = []
        for path in sorted(image_dir.iterdir(), key=lambda p: p.name):
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                continue
            label = label_dir / f"{path.stem}.png"
            if not label.is_file():
                self.skip.report(self.source_name, path.stem, "no annotation", f"{label} does not exist")
                continue
            self.samples.append((path, label))
        self.ids = [p.stem for p, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _read_label(self, path: Path) -> np.ndarray:
        """The raw values of a single-channel label map as int64 (OSError/ValueError when unusable)."""
        with Image.open(path) as im:
            if im.mode not in _LABEL_MODES:
                raise ValueError(f"label map mode {im.mode!r}, expected a single-channel image")
            arr = np.asarray(im)
        if arr.ndim != 2:
            raise ValueError(f"label map of shape {arr.shape}, expected (H, W)")
        return arr.astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedRecord:
        image_path, label_path = self.samples[i]
        rid = image_path.stem
        img = self._image(image_path, rid)
        if isinstance(img, SkippedRecord):
            return img
        try:
            raw = self._read_label(label_path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return self.skip.report(self.source_name, rid, "label unreadable", f"{label_path}: {err}")
        if (raw.shape[1], raw.shape[0]) != img.size:
            return self.skip.report(self.source_name, rid, "label size mismatch",
                                    f"image {img.size[0]}x{img.size[1]}, label {raw.shape[1]}x{raw.shape[0]}")
        if self.reduce_zero_label:
            label = np.where(raw == 0, IGNORE_INDEX, raw - 1)
        else:
            label = raw
        valid = label != IGNORE_INDEX
        limit = self.num_classes if self.num_classes is not None else IGNORE_INDEX
        bad = valid & ((label >= limit) | (label < 0))
        if bad.any():
            values = sorted(int(v) for v in np.unique(label[bad]))[:5]
            detail = f"{int(bad.sum())} pixel(s) with class ids {values} (of {limit}) set to {IGNORE_INDEX}"
            self.skip.report(self.source_name, rid, "label id out of range", detail)
            label = np.where(bad, IGNORE_INDEX, label)
        return {"image": img, "label": label.astype(np.uint8), "path": str(image_path), "id": rid}
