"""``coco_captioning`` and ``nocaps``: image captioning by masked-language modelling under a causal text mask
(``BEiT3ForCaptioning``, spec §2.2, §2.4, §4.3).

* data: the official ``coco_captioning.{train,val,test}.jsonl`` / ``nocaps.{val,test}.jsonl`` index files in
  ``DIR`` when present (spec §6), else the Karpathy JSON (``DIR/coco/dataset_coco.json``, a world from
  ``imglish data shapes``, or ``DIR/dataset_coco.json``): training is one record per caption of Karpathy
  ``train + restval``, val/test one record per image. ``nocaps`` trains on the same COCO captions (as officially)
  and evaluates on a NoCaps folder: ``DIR/nocaps/nocaps_val_4500_captions.json`` (COCO caption layout: ``images``
  with ``id`` and ``file_name``, ``annotations`` with ``image_id`` and ``caption``) with the images in
  ``DIR/nocaps/val/<file_name>``, and ``DIR/nocaps/nocaps_test_image_info.json`` with ``DIR/nocaps/test/``;
* training: the captioning transform (RandAugment per the recipe), the caption as ``data.max_text_len`` ids, then
  the official masking (``task.mask_prob`` of the tokens, 80/10/10 replacement), seeded by the sample's seed. The
  loss (term ``caption``, counted in masked tokens) is the official ``BertCaptioningLoss``: KL divergence to the
  label-smoothed one-hot target (``1 - eps`` on the true id, ``eps / (V - 1)`` on each other id, ``eps`` =
  ``task.label_smoothing``), summed over the vocabulary; once the step index exceeds ``task.drop_worst_after``,
  only the ``int(n * (1 - task.drop_worst_ratio))`` smallest per-token losses of each micro-batch are kept;
* evaluation: the official incremental beam search with the key/value cache (``task.num_beams``,
  ``task.max_gen_len``, ``task.length_penalty``), decoded without special tokens. The predictions file is the COCO
  results format ``[{"image_id", "caption"}]``; it is scored against the split's reference captions (the COCO-layout
  ``coco_karpathy_{split}_gt.json`` or ``nocaps_val_gt.json`` when found, else the captions of the Karpathy or NoCaps
  file) with :func:`imglish.evaluation.captions.caption_scores`: ``Bleu_1``..``Bleu_4``, ``METEOR`` (coco backend),
  ``ROUGE_L``, ``CIDEr``, ``SPICE`` (when its models are on disk), in percent, and ``backend`` (``"coco"`` or
  ``"python"``: which implementation computed them). NoCaps test has no public captions: its predictions are
  written (for EvalAI) and scoring them raises.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imglish.data.base import RecordDataset
from imglish.data.skip import BadRecordCounter, SkippedRecord
from imglish.tasks.base import STREAM, Task, register_task

__all__ = [
    "CocoCaptioningTask",
    "NoCapsImages",
    "NoCapsTask",
    "caption_token_losses",
    "kept_token_count",
]

_KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


# --------------------------------------------------------------------------------------------- the loss
def caption_token_losses(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-token loss of the official ``BertCaptioningLoss`` (before drop-worst and averaging).

    The target distribution puts ``1 - eps`` on the true id and ``eps / (V - 1)`` on every other id; the loss is
    ``KL(target || softmax(logits))`` summed over the vocabulary. It is computed in closed form (no ``(N, V)``
    target tensor): ``sum_j q_j log q_j - (1 - eps) log p_t - eps / (V - 1) * (sum_j log p_j - log p_t)``.

    Args:
        logits: ``(N, V)`` logits at the masked positions.
        target: ``(N,)`` original ids.
        label_smoothing: ``eps`` in ``[0, 1)``.

    Returns:
        ``(N,)`` float32 losses.

    Raises:
        ValueError: when the shapes do not match or ``label_smoothing`` is outside ``[0, 1)``.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, V) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    vocab = logits.shape[-1]
    logp = F.log_softmax(logits.float(), dim=-1)
    logp_t = logp.gather(1, target.view(-1, 1)).squeeze(1)
    eps = float(label_smoothing)
    if eps == 0.0 or vocab < 2:
        return -logp_t
    off = eps / (vocab - 1)
    entropy_term = (1.0 - eps) * torch.log(torch.tensor(1.0 - eps)) + eps * torch.log(torch.tensor(off))
    cross = (1.0 - eps) * logp_t + off * (logp.sum(-1) - logp_t)
    return entropy_term.to(logp) - cross


def kept_token_count(n: int, step: int, drop_worst_ratio: float, drop_worst_after: int) -> int:
    """How many of a micro-batch's ``n`` masked tokens the loss keeps at step index ``step`` (0-based, the
    optimizer steps done before this one): all of them up to ``drop_worst_after``, then
    ``int(n * (1 - drop_worst_ratio))`` (the official ``iter > drop_worst_after`` rule)."""
    if drop_worst_ratio > 0 and step > drop_worst_after:
        return int(n * (1.0 - drop_worst_ratio))
    return int(n)


# --------------------------------------------------------------------------------------------- NoCaps reader
class NoCapsImages(RecordDataset):
    """The images of a COCO-layout caption or image-info file (NoCaps ``nocaps_val_4500_captions.json``,
    ``nocaps_test_image_info.json``), one record per image.

    Args:
        json_path: the file (``{"images": [{"id", "file_name"}, ...], "annotations"?: [...]}``).
        image_root: the folder of the images (``<image_root>/<file_name>``).
        transform, skip, loader: see :class:`~imglish.data.base.RecordDataset`.

    Records: ``image``, ``image_id``, ``image_path`` and ``captions`` (the file's captions of the image, possibly
    empty).

    Raises:
        FileNotFoundError: if ``json_path`` does not exist.
        ValueError: if it is not JSON with an ``images`` list.
    """

    source_name = "nocaps"

    def __init__(self, json_path: str | os.PathLike, image_root: str | os.PathLike, transform: Any = None,
                 skip: BadRecordCounter | None = None, **kwargs: Any) -> None:
        super().__init__(transform, None, skip, **kwargs)
        json_path = Path(json_path)
        if not json_path.is_file():
            raise FileNotFoundError(f"NoCaps file {json_path} does not exist")
        self.source_name = json_path.name
        try:
            data = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{json_path}: not valid JSON ({err})") from err
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{json_path}: expected a COCO-layout object with an 'images' list")
        root = Path(image_root)
        caps: dict[int, list[str]] = {}
        for ann in data.get("annotations") or []:
            try:
                caps.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]).strip())
            except (KeyError, TypeError, ValueError):
                continue
        self.images: list[dict[str, Any]] = []
        for n, im in enumerate(data["images"]):
            try:
                image_id, name = int(im["id"]), str(im["file_name"])
            except (KeyError, TypeError, ValueError) as err:
                self.skip.report(self.source_name, f"images[{n}]", "malformed record", repr(err))
                continue
            self.images.append({"image_id": image_id, "path": root / name,
                                "captions": [c for c in caps.get(image_id, []) if c]})

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedRecord:
        entry = self.images[i]
        img = self._image(entry["path"], entry["image_id"])
        if isinstance(img, SkippedRecord):
            return img
        return {"image": img, "image_id": entry["image_id"], "image_path": str(entry["path"]),
                "captions": list(entry["captions"])}


class _FirstPerImage:
    """The first record of each ``image_id`` of an official training index (evaluation on the training split)."""

    def __init__(self, base: Any) -> None:
        self.base = base
        seen: set[int] = set()
        self.positions = []
        for k, item in enumerate(base.items):
            if item["image_id"] not in seen:
                seen.add(item["image_id"])
                self.positions.append(k)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.positions[i]]


# --------------------------------------------------------------------------------------------- the tasks
@register_task
class CocoCaptioningTask(Task):
    """COCO captioning on the Karpathy split (see the module docstring)."""

    name = "coco_captioning"
    model_task = "captioning"
    transform_task = "captioning"
    terms = ("caption",)
    main_metric = "CIDEr"

    # ----------------------------------------------------------------------------------------- data
    def _official(self, split: str) -> list[Path] | None:
        from imglish.data.official import official_index_files

        files = [Path(self.data_dir) / f for f in official_index_files(self.name, split)]
        return files if all(f.is_file() for f in files) else None

    def _karpathy(self) -> tuple[Path, Path]:
        """``(Karpathy JSON, image root)``."""
        root = Path(self.data_dir)
        for js, images in ((root / "coco" / "dataset_coco.json", root / "coco"), (root / "dataset_coco.json", root)):
            if js.is_file():
                return js, images
        raise FileNotFoundError(
            f"no COCO captions under {str(root)!r}: expected coco/dataset_coco.json (a world from `imglish data "
            f"shapes`), dataset_coco.json (the Karpathy file, images relative to it) or the official "
            f"coco_captioning.{{train,val,test}}.jsonl index files"
        )

    def _coco_dataset(self, split: str, skip: Any, per: str) -> Sequence[Any]:
        files = self._official(split)
        if files is not None:
            from imglish.data.official import OfficialIndexDataset

            ds = OfficialIndexDataset([str(f) for f in files], self.data_dir, self.name, skip=skip)
            return _FirstPerImage(ds) if per == "image" and split == "train" else ds
        from imglish.data.coco import KarpathyCaptions

        js, images = self._karpathy()
        return KarpathyCaptions(js, images, splits=_KARPATHY_SPLITS[split], per=per, skip=skip)

    def dataset(self, split: str, skip: Any) -> Sequence[Any]:
        """Training: one record per caption; val/test: one record per image."""
        self.check_split(split)
        return self._coco_dataset(split, skip, "caption" if split == "train" else "image")

    def eval_sets(self, split: str, skip: Any) -> dict[str, Sequence[Any]]:
        """One record per image, whatever the split (the training split too)."""
        self.check_split(split)
        if split == "train":
            return {"records": self._coco_dataset(split, skip, "image")}
        return {"records": self.dataset(split, skip)}

    def sample(self, record: Any, seed: int | None, train: bool) -> dict[str, torch.Tensor]:
        """Evaluation: ``image``, ``image_id``. Training adds the masked caption: ``text_ids`` (after masking),
        ``padding_mask``, ``language_masked_pos`` (1 at the masked positions) and ``masked_tokens`` (the original
        ids there, 0 elsewhere), all of length ``data.max_text_len``."""
        out = {
            "image": self.seeded_image(record["image"], seed, train),
            "image_id": torch.tensor(int(record["image_id"]), dtype=torch.long),
        }
        if not train:
            return out
        from imglish.data.masking import mask_caption
        from imglish.training.streams import sample_seed

        if self.tokenizer is None:
            raise ValueError(f"task {self.name!r} needs a text tokenizer (its mask id) to build training samples")
        ids, pad = self.text(record)
        g = torch.Generator().manual_seed(sample_seed(0 if seed is None else int(seed), "caption_mask", 0))
        masked, pos, tokens = mask_caption(ids[None], pad[None], self.cfg.task.mask_prob,
                                           mask_id=self.tokenizer.mask_token_id, generator=g)
        out.update(text_ids=masked[0], padding_mask=pad, language_masked_pos=pos[0], masked_tokens=tokens[0])
        return out

    # ----------------------------------------------------------------------------------------- loss
    def _kept(self, n: int, step: int) -> int:
        t = self.cfg.task
        return kept_token_count(n, step, t.drop_worst_ratio, t.drop_worst_after)

    def count_targets(self, batch: Mapping[str, Mapping[str, torch.Tensor]], step: int) -> dict[str, int]:
        """The masked tokens of the micro-batch (after ``task.drop_worst_after`` steps, the kept ones)."""
        n = int(batch[STREAM]["language_masked_pos"].sum())
        return {"caption": self._kept(n, step)}

    def loss_terms(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], step: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Sum of the kept per-token losses (so that dividing by :meth:`count_targets` gives the official mean)
        and the number of kept tokens whose argmax is the original id."""
        pos = batch["language_masked_pos"].bool()
        logits, _ = model(batch["image"], batch["text_ids"], batch["padding_mask"], pos)
        target = batch["masked_tokens"][pos]
        losses = caption_token_losses(logits, target, self.cfg.task.label_smoothing)
        keep = self._kept(int(losses.shape[0]), step)
        hits = logits.detach().argmax(-1) == target
        if keep < losses.shape[0]:
            losses, idx = torch.topk(losses, keep, largest=False)
            hits = hits[idx]
        return {"caption": (losses.sum(), hits.sum())}

    # ----------------------------------------------------------------------------------------- evaluation
    def generation_config(self) -> Any:
        """The decoding settings of ``cfg.task`` with the tokenizer's special ids."""
        from imglish.generation import GenerationConfig

        t, tok = self.cfg.task, self.tokenizer
        if tok is None:
            raise ValueError(f"task {self.name!r} needs a text tokenizer to generate captions")
        return GenerationConfig(
            max_len=t.max_gen_len, num_beams=t.num_beams, length_penalty=t.length_penalty,
            bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            mask_token_id=tok.mask_token_id,
        )

    def decode(self, ids: Sequence[int]) -> str:
        """A generated row (BOS, tokens, EOS, padding) as text: up to the first EOS, special ids skipped."""
        ids = list(ids)
        eos = self.tokenizer.eos_token_id
        if eos in ids[1:]:
            ids = ids[: ids.index(eos, 1)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def predict(self, model: nn.Module, set_name: str, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        from imglish.generation import generate

        rows = generate(model, batch["image"], self.generation_config()).cpu().tolist()
        return [
            {"index": int(i), "image_id": int(img), "caption": self.decode(row)}
            for i, img, row in zip(batch["index"].tolist(), batch["image_id"].tolist(), rows)
        ]

    def predictions(self, records: Mapping[str, list[dict[str, Any]]], split: str) -> list[dict[str, Any]]:
        """The COCO results format: ``[{"image_id", "caption"}]``."""
        return [{"image_id": r["image_id"], "caption": r["caption"]} for r in records["records"]]

    def _gt_files(self, split: str) -> list[Path]:
        """COCO-layout ground-truth files of ``split`` (BLIP's names, as the official evaluation downloads them)."""
        root = Path(self.data_dir)
        name = f"coco_karpathy_{split}_gt.json"
        return [root / "coco" / "annotations" / name, root / "annotations" / name, root / name]

    def _gt_from(self, path: Path) -> dict[int, list[str]]:
        from imglish.data.coco import load_caption_gt

        return {k: v for k, v in load_caption_gt(path).items() if v}

    def ground_truth(self, split: str, skip: Any) -> dict[int, list[str]]:
        """``{image_id: [reference captions]}`` of ``split``: a COCO-layout ``coco_karpathy_{split}_gt.json`` when
        found (``DIR/coco/annotations``, ``DIR/annotations`` or ``DIR``), else the Karpathy file's captions.

        Raises:
            FileNotFoundError: when neither is there (e.g. official index files without the ground-truth file).
        """
        self.check_split(split)
        for path in self._gt_files(split):
            if path.is_file():
                return self._gt_from(path)
        try:
            js, _ = self._karpathy()
        except FileNotFoundError:
            tried = ", ".join(str(p) for p in self._gt_files(split))
            raise FileNotFoundError(
                f"no reference captions for {self.name} {split}: put BLIP's coco_karpathy_{split}_gt.json (the "
                f"official evaluation's file) at one of {tried}, or the Karpathy dataset_coco.json in "
                f"{self.data_dir}"
            ) from None
        from imglish.data.coco import karpathy_caption_gt

        gt: dict[int, list[str]] = {}
        for ann in karpathy_caption_gt(js, _KARPATHY_SPLITS[split])["annotations"]:
            gt.setdefault(int(ann["image_id"]), []).append(ann["caption"])
        return gt

    def score(self, predictions: Any, ground_truth: Mapping[int, Sequence[str]],
              allow_missing: bool = False) -> dict[str, Any]:
        """Caption metrics (percent) of a COCO results list, plus ``backend``: the implementation used.

        Raises:
            ValueError: for a malformed list, a repeated, unknown or (unless ``allow_missing``) missing image id, a
                caption that is not a string, or nothing to score.
        """
        from imglish.evaluation.captions import caption_backend, caption_scores
        from imglish.tasks.scoring import check_ids, records_by

        preds = records_by(predictions, "image_id", ("caption",), self.name)
        check_ids(preds, ground_truth, "image_id", self.name, allow_missing)
        for key, rec in preds.items():
            if not isinstance(rec["caption"], str):
                raise ValueError(f"{self.name} prediction of image_id {key!r}: caption must be a string, "
                                 f"got {rec['caption']!r}")
        refs = {k: list(v) for k, v in ground_truth.items() if k in preds}
        if not refs:
            raise ValueError(f"{self.name}: nothing to score (no prediction)")
        backend = caption_backend(self.cfg.task.caption_backend)
        metrics: dict[str, Any] = caption_scores({k: preds[k]["caption"] for k in refs}, refs, backend=backend)
        metrics["backend"] = backend
        return metrics


@register_task
class NoCapsTask(CocoCaptioningTask):
    """NoCaps: trained on the COCO training captions, evaluated on NoCaps val/test (see the module docstring)."""

    name = "nocaps"

    _FILES = {"val": "nocaps_val_4500_captions.json", "test": "nocaps_test_image_info.json"}

    def _nocaps_file(self, split: str) -> Path | None:
        for folder in (Path(self.data_dir) / "nocaps", Path(self.data_dir)):
            path = folder / self._FILES[split]
            if path.is_file():
                return path
        return None

    def dataset(self, split: str, skip: Any) -> Sequence[Any]:
        """Training: the COCO captioning training records; val/test: one record per NoCaps image."""
        self.check_split(split)
        if split == "train":
            return super().dataset(split, skip)
        files = self._official(split)
        if files is not None:
            from imglish.data.official import OfficialIndexDataset

            return OfficialIndexDataset([str(f) for f in files], self.data_dir, self.name, skip=skip)
        path = self._nocaps_file(split)
        if path is None:
            root = Path(self.data_dir)
            raise FileNotFoundError(
                f"no NoCaps {split} split under {str(root)!r}: expected nocaps/{self._FILES[split]} with the images "
                f"in nocaps/{split}/<file_name>, or the official nocaps.{split}.jsonl index file"
            )
        return NoCapsImages(path, path.parent / split, skip=skip)

    def eval_sets(self, split: str, skip: Any) -> dict[str, Sequence[Any]]:
        self.check_split(split)
        if split == "train":
            return {"records": self._coco_dataset(split, skip, "image")}
        return {"records": self.dataset(split, skip)}

    def ground_truth(self, split: str, skip: Any) -> dict[int, list[str]]:
        """``{image_id: [reference captions]}``: train as ``coco_captioning``; val from BLIP's
        ``nocaps_val_gt.json`` or ``nocaps_val_4500_captions.json`` (``DIR/nocaps`` or ``DIR``).

        Raises:
            ValueError: for test (its captions are not public: submit the predictions to the EvalAI NoCaps
                challenge).
            FileNotFoundError: when no val caption file is found.
        """
        self.check_split(split)
        if split == "train":
            return super().ground_truth(split, skip)
        if split == "test":
            raise ValueError(
                "nocaps test has no public reference captions: submit predictions.json to the NoCaps challenge on "
                "EvalAI (scoring works on the val split)"
            )
        tried = []
        for folder in (Path(self.data_dir) / "nocaps", Path(self.data_dir)):
            for name in ("nocaps_val_gt.json", self._FILES["val"]):
                path = folder / name
                if path.is_file():
                    return self._gt_from(path)
                tried.append(str(path))
        raise FileNotFoundError(f"no NoCaps val captions: expected one of {', '.join(tried)}")

    def evaluate_records(
        self, records: Mapping[str, list[dict[str, Any]]], split: str, skip: Any
    ) -> tuple[Any, dict[str, Any]]:
        """As the base class; on test only the predictions (no metrics: the captions are not public)."""
        if split == "test":
            return self.predictions(records, split), {}
        return super().evaluate_records(records, split, skip)
