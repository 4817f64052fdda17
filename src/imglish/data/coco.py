"""COCO and Flickr30k captions: Karpathy-split JSON (``dataset_coco.json``) readers and COCO caption ground truth.

The Karpathy file holds ``{"images": [{"filepath"?, "filename", "split", "cocoid"?, "imgid", "sentences": [{"raw",
"tokens", ...}]}], "dataset": ...}``. ``split`` is one of ``train``, ``restval``, ``val``, ``test``; the official
BEiT-3 COCO training set is ``train + restval`` (spec §6).

The caption ground truth for scoring is the COCO annotation layout (``{"images": [{"id"}], "annotations":
[{"image_id", "id", "caption"}]}``) that pycocotools' ``COCO`` and pycocoevalcap read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imglish.data.base import RecordDataset, Tokenizer, Transform
from imglish.data.skip import BadRecordCounter, SkippedRecord

__all__ = ["KARPATHY_SPLITS", "KarpathyCaptions", "karpathy_caption_gt", "load_caption_gt", "write_caption_gt"]

KARPATHY_SPLITS = ("train", "restval", "val", "test")


class KarpathyCaptions(RecordDataset):
    """Image-caption records from a Karpathy-split JSON (COCO or Flickr30k).

    Args:
        json_path: the ``dataset_coco.json`` / ``dataset_flickr30k.json`` file.
        image_root: folder the images are relative to (``<root>/<filepath>/<filename>``, or ``<root>/<filename>``
            when an entry has no ``filepath``). Default: the JSON's folder.
        splits: Karpathy splits to keep, e.g. ``("train", "restval")``.
        per: ``"caption"`` (one record per caption: the pair stream, retrieval and captioning training) or
            ``"image"`` (one record per image with all its captions: evaluation).
        transform, tokenizer, skip, loader: see :class:`~imglish.data.base.RecordDataset`.

    Records (``per="caption"``): ``image``, ``text`` [, ``text_ids``], ``image_id`` (cocoid, else imgid),
    ``image_index`` (0.. over the unique images of this dataset, the official retrieval ``image_id``),
    ``image_path``. Records (``per="image"``): ``image``, ``captions`` (list of str), ``image_id``, ``image_index``,
    ``image_path``.

    Empty captions are skipped (counted as ``"empty text"``) while the index is built; an image left with no caption
    is skipped too (``"no caption"``).

    Raises:
        FileNotFoundError: if ``json_path`` does not exist.
        ValueError: if the JSON is not Karpathy-style or a split name is unknown.
    """

    source_name = "karpathy"

    def __init__(
        self,
        json_path: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        splits: Sequence[str] = ("train",),
        per: str = "caption",
        transform: Transform | None = None,
        tokenizer: Tokenizer | None = None,
        skip: BadRecordCounter | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(transform, tokenizer, skip, **kwargs)
        json_path = Path(json_path)
        if not json_path.is_file():
            raise FileNotFoundError(f"Karpathy caption file {json_path} does not exist")
        if isinstance(splits, str):
            splits = (splits,)
        bad = [s for s in splits if s not in KARPATHY_SPLITS]
        if bad:
            raise ValueError(f"unknown Karpathy split(s) {bad}; expected some of {list(KARPATHY_SPLITS)}")
        if per not in ("caption", "image"):
            raise ValueError(f"per must be 'caption' or 'image', got {per!r}")
        self.source_name = json_path.name
        self.per = per
        self.splits = tuple(splits)
        root = Path(image_root) if image_root is not None else json_path.parent
        try:
            data = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{json_path}: not valid JSON ({err})") from err
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{json_path}: expected a Karpathy JSON object with an 'images' list")
        self.images: list[dict[str, Any]] = []
        self.captions: list[tuple[int, str]] = []  # (index into self.images, caption)
        for n, entry in enumerate(data["images"]):
            if entry.get("split") not in self.splits:
                continue
            try:
                rel = Path(entry.get("filepath", "")) / entry["filename"]
                image_id = int(entry["cocoid"] if "cocoid" in entry else entry["imgid"])
                sentences = entry["sentences"]
            except (KeyError, TypeError, ValueError) as err:
                self.skip.report(self.source_name, f"images[{n}]", "malformed record", repr(err))
                continue
            caps = []
            for k, sent in enumerate(sentences):
                raw = sent.get("raw") if isinstance(sent, dict) else None
                if self._empty_text(raw):
                    self.skip.report(self.source_name, f"{image_id}/{k}", "empty text")
                    continue
                caps.append(raw.strip())
            if not caps:
                self.skip.report(self.source_name, image_id, "no caption")
                continue
            idx = len(self.images)
            self.images.append({"image_id": image_id, "path": root / rel, "captions": caps})
            self.captions.extend((idx, c) for c in caps)

    def __len__(self) -> int:
        return len(self.captions) if self.per == "caption" else len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedRecord:
        if self.per == "caption":
            idx, text = self.captions[i]
        else:
            idx, text = i, None
        entry = self.images[idx]
        rid = f"{entry['image_id']}" if text is None else f"{entry['image_id']}#{i}"
        img = self._image(entry["path"], rid)
        if isinstance(img, SkippedRecord):
            return img
        rec: dict[str, Any] = {"image": img, "image_id": entry["image_id"], "image_index": idx,
                               "image_path": str(entry["path"])}
        if text is None:
            rec["captions"] = list(entry["captions"])
            return rec
        fields = self._text_fields(text, rid)
        if isinstance(fields, SkippedRecord):
            return fields
        rec.update(fields)
        return rec


def karpathy_caption_gt(json_path: str | os.PathLike, splits: Sequence[str] = ("test",)) -> dict[str, Any]:
    """Build COCO-layout caption ground truth from a Karpathy file (what pycocotools/pycocoevalcap score against).

    Args:
        json_path: Karpathy JSON.
        splits: which Karpathy splits to include.

    Returns:
        ``{"info", "licenses", "type": "captions", "images": [{"id", "file_name"}], "annotations": [{"image_id", "id",
        "caption"}]}`` with ``image_id`` = cocoid (else imgid); empty captions are left out.
    """
    data = json.loads(Path(json_path).read_text())
    images, anns = [], []
    for entry in data["images"]:
        if entry.get("split") not in splits:
            continue
        image_id = int(entry["cocoid"] if "cocoid" in entry else entry["imgid"])
        images.append({"id": image_id, "file_name": str(Path(entry.get("filepath", "")) / entry["filename"])})
        for sent in entry["sentences"]:
            raw = sent.get("raw", "")
            if raw and raw.strip():
                anns.append({"image_id": image_id, "id": len(anns) + 1, "caption": raw.strip()})
    return {"info": {"description": f"captions of Karpathy split(s) {list(splits)}"}, "licenses": [],
            "type": "captions", "images": images, "annotations": anns}


def write_caption_gt(gt: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write caption ground truth atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(gt, sort_keys=True))
    os.replace(tmp, path)
    return path


def load_caption_gt(path: str | os.PathLike) -> dict[int, list[str]]:
    """Read a COCO-layout caption file into ``{image_id: [captions...]}`` (images without captions map to ``[]``)."""
    data = json.loads(Path(path).read_text())
    if "annotations" not in data:
        raise ValueError(f"{path}: not a COCO caption file (no 'annotations')")
    out: dict[int, list[str]] = {int(im["id"]): [] for im in data.get("images", [])}
    for ann in data["annotations"]:
        out.setdefault(int(ann["image_id"]), []).append(ann["caption"])
    return out
