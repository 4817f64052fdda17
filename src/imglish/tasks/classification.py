"""``imagenet``: image classification on mean-pooled patch tokens (``BEiT3ForImageClassification``).

* data: a class tree ``<split>/<class>/<image>`` (the world's ``DIR/imagenet/{train,val,test}``, or ImageNet's
  ``DIR/{train,val}``; test = val as in the official code), or the official ``imagenet.{train,val}.index.jsonl``
  files in ``DIR``; labels follow the sorted class folders of the training split;
* training: the ImageNet transform (RandomResizedCrop, flip, RandAugment, RandomErasing; ImageNet mean/std; spec §5),
  then per batch mixup (``task.mixup``) or cutmix (``task.cutmix``), one of them at random when both are on
  (torchvision.transforms.v2), with label smoothing ``task.label_smoothing`` on the mixed one-hot targets (as timm's
  ``Mixup`` does); loss: soft-target cross-entropy;
* evaluation: resize and center crop; top-1/top-5 accuracy (``acc1``, ``acc5``). The predictions file is
  ``[{"image": path relative to the split folder, "label": top-1 class index, "top5": [...]}]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imglish.tasks.base import Task, register_task

__all__ = ["ImageNetTask"]


@register_task
class ImageNetTask(Task):
    """ImageNet-style classification (see the module docstring)."""

    name = "imagenet"
    model_task = "imageclassification"
    transform_task = "imagenet"
    terms = ("cls",)
    uses_text = False
    main_metric = "acc1"

    # ----------------------------------------------------------------------------------------- data
    def _split_dir(self, split: str) -> Path:
        root = Path(self.data_dir)
        for cand in (root / "imagenet" / split, root / split, root / "imagenet" / "val" if split == "test" else None,
                     root / "val" if split == "test" else None):
            if cand is not None and cand.is_dir():
                return cand
        raise FileNotFoundError(
            f"no {split} split for imagenet under {str(root)!r}: expected imagenet/{split}/<class>/<image> (a world "
            f"from `imglish data shapes`), {split}/<class>/<image>, or imagenet.{split}.index.jsonl"
        )

    def _official(self, split: str) -> list[Path] | None:
        try:
            from imglish.data.official import official_index_files
        except ModuleNotFoundError:
            return None

        files = [Path(self.data_dir) / f for f in official_index_files(self.name, split)]
        return files if all(f.is_file() for f in files) else None

    @property
    def classes(self) -> list[str]:
        """Class names in label order: the training split's sorted class folders (official index files: the label
        numbers ``0..max``)."""
        if "classes" not in self.state:
            files = self._official("train")
            if files is not None:
                from imglish.data.official import OfficialIndexDataset

                ds = OfficialIndexDataset([str(f) for f in files], self.data_dir, self.name)
                n = max((int(item["label"]) for item in ds.items), default=-1) + 1
                self.state["classes"] = [str(i) for i in range(n)]
            else:
                train = self._split_dir("train")
                self.state["classes"] = sorted(d.name for d in train.iterdir() if d.is_dir())
        return self.state["classes"]

    def dataset(self, split: str, skip: Any) -> Sequence[Any]:
        self.check_split(split)
        files = self._official(split)
        if files is not None:
            from imglish.data.official import OfficialIndexDataset

            return OfficialIndexDataset([str(f) for f in files], self.data_dir, self.name, skip=skip)
        from imglish.data import ImageFolderDataset

        return ImageFolderDataset(self._split_dir(split), classes=self.classes, skip=skip)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sample(self, record: Any, seed: int | None, train: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "image": self.seeded_image(record["image"], seed, train),
            "label": torch.tensor(int(record["label"]), dtype=torch.long),
        }
        if not train:
            out["path"] = str(record.get("path", record.get("image_path", "")))
        return out

    def batch_transform(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """Mixup or cutmix (seeded by ``seed``), then label smoothing: ``batch["target"]`` is the soft target."""
        t = self.cfg.task
        n = self.num_classes
        images, labels = batch["image"], batch["label"]
        choices = []
        if t.mixup > 0:
            from torchvision.transforms import v2

            choices.append(v2.MixUp(alpha=t.mixup, num_classes=n))
        if t.cutmix > 0:
            from torchvision.transforms import v2

            choices.append(v2.CutMix(alpha=t.cutmix, num_classes=n))
        if choices:
            from imglish.training.streams import seeded_rng

            with seeded_rng(seed):
                k = int(torch.randint(len(choices), ()).item())
                images, target = choices[k](images, labels)
        else:
            target = F.one_hot(labels, n).float()
        ls = t.label_smoothing
        target = target * (1.0 - ls) + ls / n
        return {**batch, "image": images, "target": target}

    # ----------------------------------------------------------------------------------------- model and loss
    def model_kwargs(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def loss_terms(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], step: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        logits = model(image=batch["image"]).float()
        target = batch.get("target")
        if target is None:
            target = F.one_hot(batch["label"], logits.shape[-1]).float()
        loss = -(target * F.log_softmax(logits, dim=-1)).sum()
        correct = (logits.detach().argmax(-1) == batch["label"]).sum()
        return {"cls": (loss, correct)}

    # ----------------------------------------------------------------------------------------- evaluation
    def predict(self, model: nn.Module, set_name: str, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        logits = model(image=batch["image"]).float()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu().tolist()
        return [
            {"index": int(i), "image": p, "top5": t}
            for i, p, t in zip(batch["index"].tolist(), batch["path"], top)
        ]

    def _relative(self, path: str, split: str) -> str:
        """The id of an image in predictions files: its path relative to the split folder (official index files:
        relative to the data folder, as ``image_path``)."""
        p = Path(path)
        bases = [Path(self.data_dir)]
        if self._official(split) is None:
            bases.insert(0, self._split_dir(split))
        for base in bases:
            try:
                return p.resolve().relative_to(base.resolve()).as_posix()
            except ValueError:
                continue
        return p.as_posix()

    def predictions(self, records: Mapping[str, list[dict[str, Any]]], split: str) -> list[dict[str, Any]]:
        return [
            {"image": self._relative(r["image"], split), "label": r["top5"][0], "top5": r["top5"]}
            for r in records["records"]
        ]

    def ground_truth(self, split: str, skip: Any) -> dict[str, int]:
        ds = self.dataset(split, skip)
        if hasattr(ds, "samples"):
            return {self._relative(str(p), split): int(label) for p, label in ds.samples}
        return {self._relative(str(Path(self.data_dir) / it["image_path"]), split): int(it["label"]) for it in ds.items}

    def score(self, predictions: Any, ground_truth: Mapping[str, int], allow_missing: bool = False) -> dict[str, float]:
        from imglish.tasks.scoring import check_ids, records_by

        preds = records_by(predictions, "image", ("label",), self.name)
        check_ids(preds, ground_truth, "image", self.name, allow_missing)
        ground_truth = {k: v for k, v in ground_truth.items() if k in preds}
        if not ground_truth:
            raise ValueError(f"{self.name}: nothing to score (no prediction)")
        hit1 = hit5 = 0
        for key, gt in ground_truth.items():
            p = preds[key]
            top5 = [int(x) for x in p.get("top5", [p["label"]])]
            hit1 += int(int(p["label"]) == gt)
            hit5 += int(gt in top5[:5])
        n = len(ground_truth)
        return {"acc1": 100.0 * hit1 / n, "acc5": 100.0 * hit5 / n}
