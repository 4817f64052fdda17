"""``coco_retrieval`` and ``flickr30k``: image-text retrieval with the dual encoder (``BEiT3ForRetrieval``).

* data: the official ``coco_retrieval.<split>.jsonl`` / ``flickr30k.<split>.jsonl`` files in ``DIR`` when every file
  of the split is there (spec §6; ``image_id`` is then the sequential index of the image within the split), else the
  Karpathy JSON: ``DIR/coco/dataset_coco.json`` (a world from ``imglish data shapes``) or ``DIR/dataset_coco.json``
  (the real layout, images under ``DIR/<filepath>/<filename>``), ``DIR/flickr30k/dataset_flickr30k.json`` or
  ``DIR/dataset_flickr30k.json`` (images under ``flickr30k-images/``); ``image_id`` is then the ``cocoid`` (COCO)
  or ``imgid`` (Flickr30k). The COCO training split is Karpathy ``train + restval``, as officially.
* training: one record per caption; the image gets the retrieval training transform (random resized crop and flip,
  no RandAugment, spec §5) and the caption its ids and padding mask. The loss is the symmetric contrastive loss of
  ``BEiT3ForRetrieval.forward`` (term ``itc``), whose features are all-gathered across ranks with autograd, so every
  rank's texts are negatives of every image. As in the official code, captions of the same image that land in one
  batch are treated as negatives (false negatives are not masked out). ``correct`` counts the images whose most
  similar text of the local batch is their own caption.
* evaluation (:meth:`RetrievalTask.eval_sets`): every unique image of the split is encoded once and every caption
  once (the official code encodes each image once per caption and scores only its own rank's shard; here the
  embeddings of all ranks are gathered, so any number of processes gives the same numbers). Cosine similarities
  ``images @ texts.T`` (no temperature) are scored by :func:`imglish.evaluation.metrics.retrieval_recall`:
  ``tr_r1/5/10`` (image to text), ``ir_r1/5/10`` (text to image) and their mean ``r_mean``, the selection metric.

**Caption ids.** A caption is named ``"<image_id>#<k>"``: ``k`` counts the captions of that image from 0, in the
order of the Karpathy ``sentences`` (empty captions, which the reader drops, are not counted) or of the lines of the
official index file. The ids are therefore stable for a given data folder and split.

**Predictions file** (``predictions.json``)::

    {"image_to_text": [{"image_id": 42, "text_ids": ["17#3", ...]}, ...],
     "text_to_image": [{"text_id": "42#0", "image_ids": [42, 7, ...]}, ...]}

Each ranking lists the 10 best candidates (all of them when there are fewer), best first. Candidates with exactly
equal similarities are listed with the wrong ones first (then in split order): that is the pessimistic tie rule of
``retrieval_recall``, so :meth:`RetrievalTask.score` of the file gives exactly the numbers of the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imglish.tasks.base import Task, register_task

__all__ = ["Flickr30kRetrievalTask", "RetrievalTask", "caption_id", "top_ranked"]

#: how many candidates each ranking of the predictions file lists
TOP_K = 10
_KS = (1, 5, 10)


def caption_id(image_id: Any, k: int) -> str:
    """The id of the ``k``-th caption (from 0) of image ``image_id``: ``"<image_id>#<k>"``."""
    return f"{image_id}#{k}"


def top_ranked(scores: torch.Tensor, own: Callable[[int, int], torch.Tensor], k: int) -> torch.Tensor:
    """The ``k`` best columns of every row of ``scores``, best first, with the pessimistic tie rule.

    Among columns of exactly equal score, those that are not a match of the row (``own`` false) come first, then
    the matching ones; within each group, columns keep their order. So the position of the first match equals the
    rank :func:`~imglish.evaluation.metrics.retrieval_recall` gives it.

    Args:
        scores: ``(rows, columns)`` similarities.
        own: ``own(start, n)`` is the ``(n, columns)`` boolean matrix of the matches of rows ``start .. start + n``.
        k: how many columns to keep (clipped to the number of columns).

    Returns:
        ``(rows, min(k, columns))`` column indices (int64).
    """
    rows, cols = scores.shape
    k = min(k, cols)
    chunk = max(1, (1 << 22) // max(cols, 1))
    out = []
    for start in range(0, rows, chunk):
        block = scores[start:start + chunk]
        match = own(start, block.shape[0])
        first = torch.argsort(match.to(torch.int8), dim=1, stable=True)  # non-matches first, in column order
        order = torch.sort(block.gather(1, first), dim=1, descending=True, stable=True).indices[:, :k]
        out.append(first.gather(1, order))
    if not out:
        return torch.empty(0, k, dtype=torch.long)
    return torch.cat(out)


class _ImageRecords:
    """One record per unique image (``{"image", "image_id"}``), loaded from ``base[position]``."""

    def __init__(self, base: Sequence[Any], positions: Sequence[int], image_ids: Sequence[Any]) -> None:
        self.base, self.positions, self.image_ids = base, list(positions), list(image_ids)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Any:
        from imglish.data.skip import SkippedRecord

        rec = self.base[self.positions[i]]
        if isinstance(rec, SkippedRecord):
            return rec
        return {"image": rec["image"], "image_id": self.image_ids[i]}


class _Catalog:
    """What one split holds, read without decoding an image.

    Attributes:
        images: the image records (:class:`_ImageRecords`), in split order (by ``image_id`` for the official files).
        texts: one plain record per caption: ``text`` (raw) or ``text_ids``, ``image_id``, ``text_id``.
    """

    def __init__(self, images: _ImageRecords, texts: list[dict[str, Any]]) -> None:
        self.images, self.texts = images, texts

    def ground_truth(self) -> dict[Any, list[str]]:
        gt: dict[Any, list[str]] = {iid: [] for iid in self.images.image_ids}
        for t in self.texts:
            gt.setdefault(t["image_id"], []).append(t["text_id"])
        return {iid: tids for iid, tids in gt.items() if tids}


@register_task
class RetrievalTask(Task):
    """COCO image-text retrieval (see the module docstring); :class:`Flickr30kRetrievalTask` for Flickr30k."""

    name = "coco_retrieval"
    model_task = "retrieval"
    transform_task = "retrieval"
    terms = ("itc",)
    main_metric = "r_mean"
    #: the Karpathy JSON's file name and the sub-folder a world keeps it in
    karpathy_file = "dataset_coco.json"
    world_folder = "coco"
    #: imglish split -> Karpathy splits
    karpathy_splits: Mapping[str, tuple[str, ...]] = {
        "train": ("train", "restval"), "val": ("val",), "test": ("test",)}

    # ----------------------------------------------------------------------------------------- data
    def _official(self, split: str) -> list[Path] | None:
        from imglish.data.official import official_index_files

        files = [Path(self.data_dir) / f for f in official_index_files(self.name, split)]
        return files if all(f.is_file() for f in files) else None

    def _karpathy_json(self) -> Path:
        root = Path(self.data_dir)
        for cand in (root / self.world_folder / self.karpathy_file, root / self.karpathy_file):
            if cand.is_file():
                return cand
        raise FileNotFoundError(
            f"no {self.name} data under {str(root)!r}: expected {self.world_folder}/{self.karpathy_file} (a world "
            f"from `imglish data shapes`), {self.karpathy_file}, or the official "
            f"{', '.join(self._official_names())} files"
        )

    def _official_names(self) -> list[str]:
        from imglish.data.official import official_index_files

        return [f for s in ("train", "val", "test") for f in official_index_files(self.name, s)]

    def _karpathy(self, split: str, per: str, skip: Any) -> Any:
        from imglish.data.coco import KarpathyCaptions

        path = self._karpathy_json()
        return KarpathyCaptions(path, self._image_root(path), splits=self.karpathy_splits[split], per=per, skip=skip)

    def _image_root(self, json_path: Path) -> Path:
        return json_path.parent

    def _official_dataset(self, files: list[Path], skip: Any) -> Any:
        from imglish.data.official import OfficialIndexDataset

        return OfficialIndexDataset([str(f) for f in files], self.data_dir, self.name, skip=skip)

    def dataset(self, split: str, skip: Any) -> Sequence[Any]:
        """One record per caption of ``split`` (``image``, ``text`` or ``text_ids``, ``image_id``, ...)."""
        self.check_split(split)
        files = self._official(split)
        if files is not None:
            return self._official_dataset(files, skip)
        return self._karpathy(split, "caption", skip)

    def catalog(self, split: str, skip: Any) -> _Catalog:
        """The unique images and the captions of ``split``, with their ids (nothing is decoded)."""
        self.check_split(split)
        files = self._official(split)
        texts: list[dict[str, Any]] = []
        if files is not None:
            ds = self._official_dataset(files, skip)
            first: dict[int, int] = {}
            counts: dict[int, int] = {}
            for pos, item in enumerate(ds.items):
                iid = int(item["image_id"])
                first.setdefault(iid, pos)
                k = counts.get(iid, 0)
                counts[iid] = k + 1
                texts.append({"text_ids": list(item["text_ids"]), "image_id": iid, "text_id": caption_id(iid, k)})
            ids = sorted(first)  # officially the image features are ordered by image id
            return _Catalog(_ImageRecords(ds, [first[i] for i in ids], ids), texts)
        ds = self._karpathy(split, "image", skip)
        ids = [entry["image_id"] for entry in ds.images]
        for entry in ds.images:
            for k, text in enumerate(entry["captions"]):
                texts.append({"text": text, "image_id": entry["image_id"], "text_id": caption_id(entry["image_id"], k)})
        return _Catalog(_ImageRecords(ds, range(len(ids)), ids), texts)

    def sample(self, record: Any, seed: int | None, train: bool) -> dict[str, Any]:
        """Training: ``image``, ``language_tokens``, ``padding_mask`` of a caption record. Evaluation: ``image`` and
        ``image_id`` of an image record, or ``language_tokens``, ``padding_mask``, ``text_id`` and ``image_id`` of a
        caption record.

        Raises:
            ValueError: for a training record without an image or a text.
        """
        has_image = "image" in record
        has_text = record.get("text_ids") is not None or "text" in record
        if train and not (has_image and has_text):
            raise ValueError(f"{self.name}: a training record needs an image and a text, got keys {sorted(record)}")
        out: dict[str, Any] = {}
        if has_image:
            out["image"] = self.seeded_image(record["image"], seed, train)
        if has_text:
            out["language_tokens"], out["padding_mask"] = self.text(record)
        if not train:
            out["image_id"] = record["image_id"]
            if not has_image:
                out["text_id"] = record["text_id"]
        return out

    # ----------------------------------------------------------------------------------------- loss
    def loss_terms(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], step: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """The contrastive loss (a mean over the local batch, all ranks' features as negatives) times the local
        batch size, since the trainer divides each term's sum by the example count."""
        loss, vision, language = model(
            image=batch["image"], text_description=batch["language_tokens"], padding_mask=batch["padding_mask"]
        )
        n = vision.shape[0]
        with torch.no_grad():
            best = (vision.float() @ language.float().t()).argmax(-1)
            correct = (best == torch.arange(n, device=best.device)).sum()
        return {"itc": (loss.float() * n, correct)}

    # ----------------------------------------------------------------------------------------- evaluation
    def eval_sets(self, split: str, skip: Any) -> dict[str, Sequence[Any]]:
        """``{"images": one record per unique image, "texts": one record per caption}``."""
        cat = self.catalog(split, skip)
        return {"images": cat.images, "texts": cat.texts}

    def predict(self, model: nn.Module, set_name: str, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Per image ``{"index", "image_id", "embedding"}``; per caption ``{"index", "text_id", "image_id",
        "embedding"}`` (L2-normalised float32 CPU tensors)."""
        index = batch["index"].tolist()
        if set_name == "images":
            emb = model.encode_image(batch["image"]).float().cpu()
            return [{"index": int(i), "image_id": iid, "embedding": e}
                    for i, iid, e in zip(index, batch["image_id"], emb)]
        if set_name == "texts":
            emb = model.encode_text(batch["language_tokens"], batch["padding_mask"]).float().cpu()
            return [{"index": int(i), "text_id": tid, "image_id": iid, "embedding": e}
                    for i, tid, iid, e in zip(index, batch["text_id"], batch["image_id"], emb)]
        raise ValueError(f"{self.name}: unknown evaluation set {set_name!r}; expected 'images' or 'texts'")

    def _similarities(
        self, records: Mapping[str, list[dict[str, Any]]]
    ) -> tuple[torch.Tensor, torch.Tensor, list[Any], list[str]]:
        """``(scores (images, texts), text_to_image, image ids, text ids)`` of the gathered records.

        Captions whose image was not encoded (unusable, or cut by ``task.max_eval_examples``) and images left
        without a caption are left out, since neither has a defined recall.
        """
        images, texts = records.get("images", []), records.get("texts", [])
        encoded = {r["image_id"] for r in images}
        texts = [t for t in texts if t["image_id"] in encoded]
        described = {t["image_id"] for t in texts}
        images = [r for r in images if r["image_id"] in described]
        if not images:
            raise ValueError(f"{self.name}: nothing to evaluate (no image with an encoded caption)")
        row = {r["image_id"]: i for i, r in enumerate(images)}
        img = torch.stack([r["embedding"].float() for r in images])
        txt = torch.stack([t["embedding"].float() for t in texts])
        t2i = torch.tensor([row[t["image_id"]] for t in texts], dtype=torch.long)
        return img @ txt.t(), t2i, [r["image_id"] for r in images], [t["text_id"] for t in texts]

    @staticmethod
    def _rankings(scores: torch.Tensor, t2i: torch.Tensor, image_ids: list[Any], text_ids: list[str]) -> dict:
        num_images = scores.shape[0]
        i2t = top_ranked(
            scores, lambda s, n: t2i[None, :] == torch.arange(s, s + n)[:, None], TOP_K
        )
        t2i_rank = top_ranked(
            scores.t(), lambda s, n: torch.arange(num_images)[None, :] == t2i[s:s + n, None], TOP_K
        )
        return {
            "image_to_text": [{"image_id": iid, "text_ids": [text_ids[j] for j in row]}
                              for iid, row in zip(image_ids, i2t.tolist())],
            "text_to_image": [{"text_id": tid, "image_ids": [image_ids[j] for j in row]}
                              for tid, row in zip(text_ids, t2i_rank.tolist())],
        }

    def predictions(self, records: Mapping[str, list[dict[str, Any]]], split: str) -> dict[str, Any]:
        """The rankings file (see the module docstring) of the gathered records."""
        return self._rankings(*self._similarities(records))

    def evaluate_records(
        self, records: Mapping[str, list[dict[str, Any]]], split: str, skip: Any
    ) -> tuple[Any, dict[str, float]]:
        """The rankings and :func:`~imglish.evaluation.metrics.retrieval_recall` of the similarity matrix."""
        from imglish.evaluation.metrics import retrieval_recall

        scores, t2i, image_ids, text_ids = self._similarities(records)
        metrics = retrieval_recall(scores, t2i, _KS)
        return self._rankings(scores, t2i, image_ids, text_ids), metrics

    def ground_truth(self, split: str, skip: Any) -> dict[Any, list[str]]:
        """``{image_id: [its caption ids]}`` of ``split``."""
        return self.catalog(split, skip).ground_truth()

    def score(
        self, predictions: Any, ground_truth: Mapping[Any, Sequence[str]], allow_missing: bool = False
    ) -> dict[str, float]:
        """Recall at 1, 5 and 10 both ways (percent) of a rankings file against ``{image_id: [caption ids]}``.

        A text retrieval hit at k: one of the image's captions is among the first k ``text_ids``; an image
        retrieval hit at k: the caption's image is among the first k ``image_ids``. Every ranking must list at
        least 10 candidates (or all of them when there are fewer), each known and at most once.

        With ``allow_missing`` only the predicted images and captions are scored, and they are the candidates.

        Raises:
            ValueError: for a malformed file, unknown ids, missing ids (unless ``allow_missing``), or a ranking that
                is too short, repeats a candidate or names one outside the split.
        """
        from imglish.tasks.scoring import check_ids, records_by

        if not isinstance(predictions, dict) or not all(
            isinstance(predictions.get(k), list) for k in ("image_to_text", "text_to_image")
        ):
            raise ValueError(
                f"{self.name} predictions must be a JSON object with the lists 'image_to_text' ([{{'image_id', "
                f"'text_ids'}}]) and 'text_to_image' ([{{'text_id', 'image_ids'}}]), got "
                f"{type(predictions).__name__}"
            )
        i2t = records_by(predictions["image_to_text"], "image_id", ("text_ids",), self.name)
        t2i = records_by(predictions["text_to_image"], "text_id", ("image_ids",), self.name)
        image_of = {tid: iid for iid, tids in ground_truth.items() for tid in tids}
        check_ids(i2t, ground_truth, "image_id", self.name, allow_missing)
        check_ids(t2i, image_of, "text_id", self.name, allow_missing)
        images = [iid for iid in ground_truth if iid in i2t]
        texts = [tid for tid in image_of if tid in t2i]
        image_set, text_set = set(images), set(texts)
        # an image is scored when one of its captions is a candidate, a caption when its image is one
        tr_rows = [iid for iid in images if any(t in text_set for t in ground_truth[iid])]
        ir_rows = [tid for tid in texts if image_of[tid] in image_set]
        if not tr_rows or not ir_rows:
            raise ValueError(f"{self.name}: nothing to score (no prediction)")

        def ranking(rec: Mapping[str, Any], key: str, where: str, candidates: set, n: int) -> list[Any]:
            ranked = rec[key]
            if not isinstance(ranked, list):
                raise ValueError(f"{self.name} predictions: {where}: {key!r} must be a list, got {ranked!r:.80}")
            need = min(TOP_K, n)
            if len(ranked) < need:
                raise ValueError(
                    f"{self.name} predictions: {where} ranks {len(ranked)} candidate(s); at least {need} are needed"
                )
            unknown = [c for c in ranked if c not in candidates]
            if unknown:
                raise ValueError(f"{self.name} predictions: {where} ranks unknown {key[:-1]}(s) {unknown[:5]!r}")
            if len(set(ranked)) != len(ranked):
                raise ValueError(f"{self.name} predictions: {where} ranks a candidate more than once")
            return ranked

        tr_hits = {k: 0 for k in _KS}
        for iid in tr_rows:
            ranked = ranking(i2t[iid], "text_ids", f"image_id {iid!r}", text_set, len(texts))
            hits = [image_of[t] == iid for t in ranked]
            for k in _KS:
                tr_hits[k] += int(any(hits[:k]))
        ir_hits = {k: 0 for k in _KS}
        for tid in ir_rows:
            ranked = ranking(t2i[tid], "image_ids", f"text_id {tid!r}", image_set, len(images))
            hits = [iid == image_of[tid] for iid in ranked]
            for k in _KS:
                ir_hits[k] += int(any(hits[:k]))
        result: dict[str, float] = {}
        for k in _KS:
            result[f"tr_r{k}"] = tr_hits[k] * 100.0 / len(tr_rows)
        for k in _KS:
            result[f"ir_r{k}"] = ir_hits[k] * 100.0 / len(ir_rows)
        result["r_mean"] = sum(result.values()) / len(result)
        return result


@register_task
class Flickr30kRetrievalTask(RetrievalTask):
    """Flickr30k image-text retrieval: :class:`RetrievalTask` over ``dataset_flickr30k.json`` (images in
    ``flickr30k-images/``; Karpathy train, val and test) or the official ``flickr30k.<split>.jsonl`` files."""

    name = "flickr30k"
    karpathy_file = "dataset_flickr30k.json"
    world_folder = "flickr30k"
    karpathy_splits = {"train": ("train",), "val": ("val",), "test": ("test",)}

    def _image_root(self, json_path: Path) -> Path:
        return json_path.parent / "flickr30k-images"
