"""``nlvr2``: is a statement about a pair of images true? (``BEiT3ForVisualReasoning``; spec §2.2, §5, §8).

* data: the official index files in ``DIR`` (``nlvr2.train.index.jsonl``, ``nlvr2.dev.index.jsonl``,
  ``nlvr2.test-P.index.jsonl``), read with :class:`~imglish.data.official.OfficialIndexDataset`; else the NLVR2
  JSON-lines files ``train.json``, ``dev.json``, ``test1.json`` with their ``images/`` folder, in ``DIR/nlvr2``
  (a world from ``imglish data shapes``), ``DIR`` or ``DIR/data`` (images then under ``DIR``). Splits: train, val
  (dev), test (test-P);
* sample: both images through the NLVR2 transform independently (each with its own seed; no RandAugment in the
  official recipe, and "left"/"right" in the text is not swapped by flips), the statement and the label
  (1 = "True");
* loss: cross-entropy over the two classes, summed over the micro-batch (term ``nlvr2``);
* evaluation: the argmax class. The predictions file is ``[{"identifier", "label"}]`` (0/1) and is scored as
  accuracy in percent against the split's labels (``accuracy``). An example with a missing or unreadable image is
  skipped and counted, in training (the sampler replaces it) and in evaluation (``metrics.json`` ``"skipped"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imglish.tasks.base import Task, register_task

__all__ = ["NLVR2Task"]

_FILES = {"train": "train.json", "val": "dev.json", "test": "test1.json"}
#: salt of the second image's seed (the two images of a pair are augmented independently)
_SECOND_IMAGE_SALT = 0x9E3779B97F4A7C15


@register_task
class NLVR2Task(Task):
    """NLVR2 (see the module docstring)."""

    name = "nlvr2"
    model_task = "nlvr2"
    transform_task = "nlvr2"
    terms = ("nlvr2",)
    main_metric = "accuracy"

    # ----------------------------------------------------------------------------------------- data
    @property
    def root(self) -> Path:
        if self.data_dir is None:
            raise ValueError("task nlvr2 needs a data folder (data.path)")
        return Path(self.data_dir)

    def _official(self, split: str) -> list[Path] | None:
        from imglish.data.official import official_index_files

        files = [self.root / f for f in official_index_files(self.name, split)]
        return files if all(f.is_file() for f in files) else None

    def _json_file(self, split: str) -> tuple[Path, Path]:
        """``(JSON-lines file, folder holding images/)`` of a split."""
        name = _FILES[split]
        for path, images in ((self.root / "nlvr2" / name, self.root / "nlvr2"), (self.root / name, self.root),
                             (self.root / "data" / name, self.root)):
            if path.is_file():
                return path, images
        raise FileNotFoundError(
            f"no NLVR2 {split} split under {str(self.root)!r}: expected nlvr2/{name} with nlvr2/images/ (a world from "
            f"`imglish data shapes`), {name} or data/{name} with images/ beside, or "
            f"{', '.join(self._index_names(split))}"
        )

    def _index_names(self, split: str) -> list[str]:
        from imglish.data.official import official_index_files

        return official_index_files(self.name, split)

    def dataset(self, split: str, skip: Any) -> Sequence[Any]:
        self.check_split(split)
        files = self._official(split)
        if files is not None:
            from imglish.data.official import OfficialIndexDataset

            return OfficialIndexDataset([str(f) for f in files], self.root, self.name, skip=skip)
        from imglish.data.nlvr2 import NLVR2Dataset

        path, images = self._json_file(split)
        return NLVR2Dataset(path, root=images, skip=skip)

    def sample(self, record: Any, seed: int | None, train: bool) -> dict[str, Any]:
        ids, pad = self.text(record)
        seed2 = None if seed is None else (int(seed) ^ _SECOND_IMAGE_SALT) & ((1 << 63) - 1)
        out: dict[str, Any] = {
            "image": self.seeded_image(record["image"], seed, train),
            "image2": self.seeded_image(record["image2"], seed2, train),
            "text": ids,
            "padding_mask": pad,
            "label": torch.tensor(int(record["label"]), dtype=torch.long),
        }
        if not train:
            out["identifier"] = str(record["identifier"])
        return out

    # ----------------------------------------------------------------------------------------- loss
    @staticmethod
    def _logits(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return model(image_a=batch["image"], image_b=batch["image2"], text_description=batch["text"],
                     padding_mask=batch["padding_mask"]).float()

    def loss_terms(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], step: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        logits = self._logits(model, batch)
        loss = F.cross_entropy(logits, batch["label"], reduction="sum")
        correct = (logits.detach().argmax(-1) == batch["label"]).sum()
        return {"nlvr2": (loss, correct)}

    # ----------------------------------------------------------------------------------------- evaluation
    def predict(self, model: nn.Module, set_name: str, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        pred = self._logits(model, batch).argmax(-1).cpu().tolist()
        return [
            {"index": int(i), "identifier": ident, "label": int(p)}
            for i, ident, p in zip(batch["index"].tolist(), batch["identifier"], pred)
        ]

    def predictions(self, records: Mapping[str, list[dict[str, Any]]], split: str) -> list[dict[str, Any]]:
        """``[{"identifier", "label"}]`` (0/1 predicted) in record order."""
        return [{"identifier": r["identifier"], "label": r["label"]} for r in records["records"]]

    def ground_truth(self, split: str, skip: Any) -> dict[str, int]:
        """``{identifier: label}`` of the split (read from the index: no image is loaded)."""
        ds = self.dataset(split, skip)
        return {str(it["identifier"]): int(it["label"]) for it in ds.items}

    def score(self, predictions: Any, ground_truth: Mapping[str, int], allow_missing: bool = False) -> dict[str, float]:
        """``{"accuracy": ...}`` (percent) of ``[{"identifier", "label"}]``.

        Raises:
            ValueError: for a malformed file, a label other than 0/1, unknown identifiers, or (unless
                ``allow_missing``) identifiers of the split without a prediction.
        """
        from imglish.evaluation.metrics import accuracy
        from imglish.tasks.scoring import check_ids, records_by

        preds = records_by(predictions, "identifier", ("label",), self.name)
        check_ids(preds, ground_truth, "identifier", self.name, allow_missing)
        keys = [k for k in ground_truth if k in preds]
        if not keys:
            raise ValueError(f"{self.name}: nothing to score (no prediction)")
        labels = []
        for k in keys:
            p = preds[k]["label"]
            if isinstance(p, bool) or p not in (0, 1):
                raise ValueError(f"{self.name} prediction for identifier {k!r}: 'label' must be 0 or 1, got {p!r}")
            labels.append(int(p))
        return {"accuracy": accuracy(labels, [int(ground_truth[k]) for k in keys])}
