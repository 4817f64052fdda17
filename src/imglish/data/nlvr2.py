"""NLVR2: JSON lines with an identifier, a sentence and a True/False label; two image files per example.

Official image naming (spec §6): the identifier ``train-10171-0-0`` has the prefix ``train-10171-0`` (the identifier
without its last ``-`` part); the images are ``images/train/<directory>/<prefix>-img0.png`` and ``-img1.png`` for the
training set, and ``images/dev/<prefix>-img0.png`` / ``images/test1/<prefix>-img0.png`` (no directory) for the dev
and test-P sets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from imglish.data.base import RecordDataset, Tokenizer, Transform
from imglish.data.skip import BadRecordCounter, SkippedRecord

__all__ = ["NLVR2Dataset", "nlvr2_image_paths"]


def nlvr2_image_paths(root: str | os.PathLike, identifier: str, directory: str | int | None = None) -> tuple[Path, Path]:
    """Left and right image paths of an NLVR2 example.

    Args:
        root: the NLVR2 folder (holding ``images/``).
        identifier: e.g. ``"train-10171-0-0"``, ``"dev-850-0-0"``, ``"test1-0-1-0"``; its first part names the
            image folder.
        directory: the ``directory`` field (training set only).

    Returns:
        ``(left, right)`` paths.

    Raises:
        ValueError: if the identifier does not have the ``<split>-<n>-<n>-<n>`` shape or a training example has no
            directory.
    """
    parts = identifier.split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} does not look like '<split>-<set>-<pair>-<sentence>'")
    split = parts[0]
    prefix = "-".join(parts[:-1])
    folder = Path(root) / "images" / split
    if split == "train":
        if directory is None:
            raise ValueError(f"NLVR2 training example {identifier!r} has no 'directory' field")
        folder = folder / str(directory)
    return folder / f"{prefix}-img0.png", folder / f"{prefix}-img1.png"


class NLVR2Dataset(RecordDataset):
    """Records from an NLVR2 JSON-lines file (``train.json``, ``dev.json``, ``test1.json``).

    Args:
        jsonl_path: the JSON-lines file.
        root: the NLVR2 folder holding ``images/``; default: the file's folder.
        transform, tokenizer, skip, loader: see :class:`~imglish.data.base.RecordDataset`. The transform is applied
            to each image independently.

    Records: ``image`` (left), ``image2`` (right), ``text`` [, ``text_ids``], ``label`` (1 for "True", 0 for
    "False"), ``identifier``.

    Malformed JSON lines, missing fields, labels other than True/False and empty sentences are skipped (counted) while
    the index is built; missing or unreadable images when an item is loaded.

    Raises:
        FileNotFoundError: if the file does not exist.
    """

    source_name = "nlvr2"

    def __init__(
        self,
        jsonl_path: str | os.PathLike,
        root: str | os.PathLike | None = None,
        transform: Transform | None = None,
        tokenizer: Tokenizer | None = None,
        skip: BadRecordCounter | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(transform, tokenizer, skip, **kwargs)
        path = Path(jsonl_path)
        if not path.is_file():
            raise FileNotFoundError(f"NLVR2 file {path} does not exist")
        self.source_name = path.name
        root = Path(root) if root is not None else path.parent
        self.items: list[dict[str, Any]] = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    ident, sentence, label = rec["identifier"], rec["sentence"], rec["label"]
                    left, right = nlvr2_image_paths(root, ident, rec.get("directory"))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
                    self.skip.report(self.source_name, f"line {n}", "malformed record", repr(err))
                    continue
                if str(label) not in ("True", "False"):
                    self.skip.report(self.source_name, ident, "bad label", f"label {label!r}")
                    continue
                if self._empty_text(sentence):
                    self.skip.report(self.source_name, ident, "empty text")
                    continue
                self.items.append({"identifier": ident, "text": sentence.strip(), "label": int(str(label) == "True"),
                                   "left": left, "right": right})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedRecord:
        item = self.items[i]
        left = self._image(item["left"], item["identifier"])
        if isinstance(left, SkippedRecord):
            return left
        right = self._image(item["right"], item["identifier"])
        if isinstance(right, SkippedRecord):
            return right
        fields = self._text_fields(item["text"], item["identifier"])
        if isinstance(fields, SkippedRecord):
            return fields
        return {"image": left, "image2": right, **fields, "label": item["label"], "identifier": item["identifier"]}
