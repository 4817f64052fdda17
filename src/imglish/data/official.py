"""The ``*.index.jsonl`` files of the official BEiT-3 code (spec §6): read them, and write them from a world.

Users of the official code already have these files (one ``json.dumps`` object per line, image paths relative to the
official ``--data_path``). :class:`OfficialIndexDataset` reads them into the same dict records as the imglish readers
of the raw datasets (:class:`~imglish.data.coco.KarpathyCaptions`, :class:`~imglish.data.vqav2.VQAv2Dataset`, ...), so
code downstream does not care which reader fed it. :func:`write_official_index` writes them from a world made by
``imglish data shapes``, so tests and users can produce them without the official code.

Fields of a line, per task (the official names):

==================================  =========================================================================
task                                fields of one line
==================================  =========================================================================
``imagenet``                        ``image_path``, ``label``
``nlvr2``                           ``image_path``, ``image2_path``, ``text_segment``, ``label``, ``identifier``
``vqav2``                           ``image_path``, ``text_segment``, ``labels``, ``scores``, ``qid``
``coco_retrieval``, ``flickr30k``   ``image_path``, ``text_segment``, ``image_id`` (sequential within the split)
``coco_captioning``, ``nocaps``     ``image_path``, ``text_segment`` (``null`` on val/test lines), ``image_id``
==================================  =========================================================================

``text_segment`` holds token ids **without** BOS/EOS (``tokenizer.convert_tokens_to_ids(tokenizer.tokenize(raw))``,
spec §4.1); the model input is built from them by :func:`imglish.data.collate.text_segment` (spec §4.2).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imglish.data.base import RecordDataset, Transform
from imglish.data.skip import BadRecordCounter, SkippedRecord
from imglish.data.vqav2 import load_answer_vocab
from imglish.tokenizers.image import ImageLoadError, load_image

__all__ = [
    "OFFICIAL_TASKS",
    "OfficialIndexDataset",
    "load_answer2label",
    "official_index_files",
    "write_official_index",
]

#: The official ``--task`` names.
OFFICIAL_TASKS = ("imagenet", "vqav2", "nlvr2", "coco_retrieval", "flickr30k", "coco_captioning", "nocaps")

# split -> index files, per task (spec §6). "val"/"test" are the imglish names; the official aliases are accepted too.
_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "imagenet": {
        "train": ("imagenet.train.index.jsonl",),
        "val": ("imagenet.val.index.jsonl",),
        "test": ("imagenet.val.index.jsonl",),  # the official test set is the val set
    },
    "nlvr2": {
        "train": ("nlvr2.train.index.jsonl",),
        "val": ("nlvr2.dev.index.jsonl",),
        "dev": ("nlvr2.dev.index.jsonl",),
        "test": ("nlvr2.test-P.index.jsonl",),
        "test-P": ("nlvr2.test-P.index.jsonl",),
    },
    "vqav2": {
        "train": ("vqa.train.jsonl", "vqa.trainable_val.jsonl"),
        "val": ("vqa.rest_val.jsonl",),
        "test": ("vqa.test.jsonl",),
        "test-dev": ("vqa.test-dev.jsonl",),
    },
    "coco_retrieval": {s: (f"coco_retrieval.{s}.jsonl",) for s in ("train", "val", "test")},
    "flickr30k": {s: (f"flickr30k.{s}.jsonl",) for s in ("train", "val", "test")},
    "coco_captioning": {s: (f"coco_captioning.{s}.jsonl",) for s in ("train", "val", "test")},
    "nocaps": {
        "train": ("coco_captioning.train.jsonl",),  # NoCaps trains on COCO captions
        "val": ("nocaps.val.jsonl",),
        "test": ("nocaps.test.jsonl",),
    },
}

_TEXT_REQUIRED = {"nlvr2", "vqav2", "coco_retrieval", "flickr30k"}
_CAPTIONING = {"coco_captioning", "nocaps"}


def _check_task(task: str) -> str:
    if task not in _FILES:
        raise ValueError(f"unknown official task {task!r}; expected one of {', '.join(OFFICIAL_TASKS)}")
    return task


def official_index_files(task: str, split: str) -> list[str]:
    """The official index file names of one task and split (spec §6), in reading order.

    Args:
        task: one of :data:`OFFICIAL_TASKS`.
        split: ``"train"``, ``"val"`` or ``"test"``; also the official aliases ``"dev"`` and ``"test-P"`` (NLVR2) and
            ``"test-dev"`` (VQAv2).

    Returns:
        file names (no folder); VQAv2 ``train`` is ``vqa.train.jsonl`` + ``vqa.trainable_val.jsonl``, ImageNet
        ``test`` is the val file, NoCaps ``train`` is ``coco_captioning.train.jsonl``.

    Raises:
        ValueError: on an unknown task or split (the message lists the valid ones).
    """
    splits = _FILES[_check_task(task)]
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for task {task!r}; expected one of {', '.join(splits)}")
    return list(splits[split])


def load_answer2label(path: str | os.PathLike) -> dict[str, int]:
    """Read ``answer2label.txt`` (JSON lines ``{"answer": ..., "label": i}``) into ``{answer: label}``.

    Raises:
        ValueError: if the labels are not 0..n-1 in file order (see :func:`~imglish.data.vqav2.load_answer_vocab`).
    """
    return {a: i for i, a in enumerate(load_answer_vocab(path))}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(_is_int(t) for t in x)


class OfficialIndexDataset(RecordDataset):
    """Records from official BEiT-3 index files (``*.jsonl``, spec §6).

    Args:
        index_files: one file or a list of files, read in order (VQAv2 train is ``vqa.train.jsonl`` +
            ``vqa.trainable_val.jsonl``; :func:`official_index_files` gives the names). A relative path that does not
            exist as given is looked up under ``data_root``.
        data_root: the folder the ``image_path`` fields are relative to (the official ``--data_path``; for files
            written by :func:`write_official_index`, its ``out_dir``).
        task: one of :data:`OFFICIAL_TASKS`.
        transform, skip, loader: see :class:`~imglish.data.base.RecordDataset` (``loader=None``: ``load_image``).
        answer2label: VQAv2 only: ``{answer: label}`` (see :func:`load_answer2label`), a list of answers (position
            = label) or the path of ``answer2label.txt``; labelled records then carry a dense ``target``.
        add_special: wrap ``text_ids`` as ``[0] + ids + [2]`` (as the imglish readers with a ``TextTokenizer``
            give them). Default False: the ids of ``text_segment`` as they are.

    Records, per task (``image`` is the loaded, transformed image; paths are ``data_root / image_path``):

    * ``imagenet``: ``image``, ``label``, ``path``;
    * ``nlvr2``: ``image``, ``image2``, ``text_ids``, ``label``, ``identifier``;
    * ``vqav2``: ``image``, ``text_ids``, ``question_id`` (``qid``); lines with labels add ``labels``, ``scores``
      and, given ``answer2label``, ``target`` (float tensor of the vocabulary size); test lines (no labels) add
      nothing;
    * ``coco_retrieval``, ``flickr30k``: ``image``, ``text_ids``, ``image_id`` (the sequential per-split index),
      ``image_path``;
    * ``coco_captioning``, ``nocaps``: ``image``, ``image_id``, ``image_path``, and ``text_ids`` on training lines
      (val/test lines have ``text_segment: null``).

    Malformed lines (bad JSON, missing or mistyped fields), empty ``text_segment`` where a text is required and labels
    outside ``answer2label`` are counted in ``__init__`` (``"malformed record"``, ``"empty text"``, ``"bad label"``)
    and left out of the index; a missing or unreadable image gives a :class:`SkippedRecord` when the item is loaded.

    Raises:
        ValueError: on an unknown task.
        FileNotFoundError: if an index file does not exist.
    """

    source_name = "official-index"

    def __init__(
        self,
        index_files: str | os.PathLike | Sequence[str | os.PathLike],
        data_root: str | os.PathLike,
        task: str,
        transform: Transform | None = None,
        skip: BadRecordCounter | None = None,
        loader: Callable[[str | os.PathLike], Any] | None = None,
        answer2label: Mapping[str, int] | Sequence[str] | str | os.PathLike | None = None,
        add_special: bool = False,
    ) -> None:
        super().__init__(transform, None, skip, loader if loader is not None else load_image)
        self.task = _check_task(task)
        self.data_root = Path(data_root)
        self.add_special = bool(add_special)
        if isinstance(index_files, (str, os.PathLike)):
            index_files = [index_files]
        self.index_files = [self._resolve(f) for f in index_files]
        self.answer2label: dict[str, int] | None = None
        if answer2label is not None:
            if isinstance(answer2label, (str, os.PathLike)):
                self.answer2label = load_answer2label(answer2label)
            elif isinstance(answer2label, Mapping):
                self.answer2label = {str(a): int(i) for a, i in answer2label.items()}
            else:
                self.answer2label = {a: i for i, a in enumerate(answer2label)}
        self.num_labels = (max(self.answer2label.values()) + 1 if self.answer2label else 0)
        self.items: list[dict[str, Any]] = []
        for path in self.index_files:
            self._read(path)

    def _resolve(self, f: str | os.PathLike) -> Path:
        p = Path(f)
        if not p.is_file() and not p.is_absolute() and (self.data_root / p).is_file():
            p = self.data_root / p
        if not p.is_file():
            raise FileNotFoundError(f"official index file {p} does not exist (looked under {self.data_root} too)")
        return p

    # -- index ------------------------------------------------------------------------------------------------------
    def _read(self, path: Path) -> None:
        source = path.name
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"line {n}"
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise TypeError(f"a line must be a JSON object, got {type(rec).__name__}")
                    item = self._parse(rec)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                    self.skip.report(source, where, "malformed record", repr(err))
                    continue
                if isinstance(item, tuple):  # (reason, detail): a well-formed line that cannot be used
                    self.skip.report(source, item[2] if len(item) > 2 else where, item[0], item[1])
                    continue
                item["source"], item["where"] = source, where
                self.items.append(item)

    def _path(self, rec: Mapping[str, Any], key: str) -> str:
        p = rec[key]
        if not isinstance(p, str) or not p:
            raise TypeError(f"{key!r} must be a non-empty string, got {p!r}")
        return p

    def _text(self, rec: Mapping[str, Any]) -> list[int] | None:
        ids = rec["text_segment"]
        if ids is None:
            return None
        if not _is_ids(ids):
            raise TypeError(f"'text_segment' must be a list of token ids, got {ids!r:.80}")
        return ids

    def _parse(self, rec: Mapping[str, Any]) -> dict[str, Any] | tuple[str, ...]:
        """The index item of one line; ``(reason, detail[, record id])`` for a well-formed line that is unusable;
        raises ``KeyError``/``TypeError``/``ValueError`` on a malformed one."""
        task = self.task
        item: dict[str, Any] = {"image_path": self._path(rec, "image_path")}
        if task == "imagenet":
            label = rec["label"]
            if not _is_int(label) or label < 0:
                return ("bad label", f"label {label!r}")
            item["label"] = label
            return item
        if task in _TEXT_REQUIRED or task in _CAPTIONING:
            ids = self._text(rec)
            if task in _TEXT_REQUIRED and ids is None:
                raise ValueError("'text_segment' is null but this task needs a text")
            if ids is not None and not ids:
                return ("empty text", "text_segment is []")
            item["text_ids"] = ids
        if task == "nlvr2":
            item["image2_path"] = self._path(rec, "image2_path")
            label, ident = rec["label"], rec["identifier"]
            if not isinstance(ident, str):
                raise TypeError(f"'identifier' must be a string, got {ident!r}")
            if label not in (0, 1) or isinstance(label, bool):
                return ("bad label", f"label {label!r}", ident)
            item["label"], item["identifier"] = int(label), ident
        elif task == "vqav2":
            qid = rec["qid"]
            if not _is_int(qid):
                raise TypeError(f"'qid' must be an int, got {qid!r}")
            labels, scores = rec.get("labels") or [], rec.get("scores") or []
            if not _is_ids(labels) or not isinstance(scores, list) or len(labels) != len(scores):
                raise ValueError(f"'labels' and 'scores' must be lists of the same length, got {labels!r}, {scores!r}")
            if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
                raise TypeError(f"'scores' must be numbers, got {scores!r}")
            if self.answer2label is not None:
                bad = [lab for lab in labels if not 0 <= lab < self.num_labels]
                if bad:
                    return ("bad label", f"labels {bad} outside the {self.num_labels} answers", qid)
            item["question_id"] = qid
            if labels:
                item["labels"], item["scores"] = list(labels), [float(s) for s in scores]
        else:  # retrieval, captioning
            image_id = rec["image_id"]
            if not _is_int(image_id):
                raise TypeError(f"'image_id' must be an int, got {image_id!r}")
            item["image_id"] = image_id
        return item

    # -- items ------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def _record_id(self, item: Mapping[str, Any]) -> str:
        if self.task == "vqav2":
            return str(item["question_id"])
        if self.task == "nlvr2":
            return item["identifier"]
        return item["where"]

    def _ids(self, ids: list[int]) -> list[int]:
        return [0, *ids, 2] if self.add_special else list(ids)

    def _load(self, path: Path, item: Mapping[str, Any], rid: str) -> Any:
        """Load (and transform) an image, or count it as skipped under the index file's name."""
        try:
            img = self.loader(path)
        except ImageLoadError as err:
            reason = "image missing" if not path.exists() else "image unreadable"
            return self.skip.report(item["source"], rid, reason, str(err))
        return self.transform(img) if self.transform is not None else img

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedRecord:
        item = self.items[i]
        rid = self._record_id(item)
        path = self.data_root / item["image_path"]
        img = self._load(path, item, rid)
        if isinstance(img, SkippedRecord):
            return img
        task = self.task
        if task == "imagenet":
            return {"image": img, "label": item["label"], "path": str(path)}
        if task == "nlvr2":
            img2 = self._load(self.data_root / item["image2_path"], item, rid)
            if isinstance(img2, SkippedRecord):
                return img2
            return {"image": img, "image2": img2, "text_ids": self._ids(item["text_ids"]), "label": item["label"],
                    "identifier": item["identifier"]}
        if task == "vqav2":
            rec: dict[str, Any] = {"image": img, "text_ids": self._ids(item["text_ids"]),
                                   "question_id": item["question_id"]}
            if "labels" in item:
                rec["labels"], rec["scores"] = list(item["labels"]), list(item["scores"])
                if self.answer2label is not None:
                    target = torch.zeros(self.num_labels, dtype=torch.float32)
                    target[torch.tensor(item["labels"], dtype=torch.long)] = torch.tensor(item["scores"],
                                                                                         dtype=torch.float32)
                    rec["target"] = target
            return rec
        rec = {"image": img, "image_id": item["image_id"], "image_path": str(path)}
        if item.get("text_ids") is not None:
            rec["text_ids"] = self._ids(item["text_ids"])
        return rec


# ---------------------------------------------------------------------------------------------------------------------
# writing from a synthetic world
# ---------------------------------------------------------------------------------------------------------------------


def _tokenizer_fn(tokenize: Any) -> Callable[[str], list[int]]:
    """``str -> ids without BOS/EOS``; an object with ``tokenize`` + ``convert_tokens_to_ids`` (``TextTokenizer``, an
    XLM-R tokenizer) is used as the official code does, anything else is called."""
    if hasattr(tokenize, "tokenize") and hasattr(tokenize, "convert_tokens_to_ids"):
        tok = tokenize
        return lambda text: list(tok.convert_tokens_to_ids(tok.tokenize(text)))
    if not callable(tokenize):
        raise TypeError(f"tokenize must be a callable str -> list[int], got {type(tokenize).__name__}")
    return tokenize


def _write_jsonl(path: Path, lines: Iterable[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in lines:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)
    return path


def _link(out_dir: Path, name: str, target: Path) -> None:
    """Make ``out_dir/name`` lead to ``target`` (a relative symlink); keep what is already there if it does."""
    dst = out_dir / name
    if dst.exists() and os.path.samefile(dst, target):
        return
    if dst.exists() and not dst.is_symlink():
        raise FileExistsError(f"{dst} exists and is not {target}; choose another output folder")
    tmp = out_dir / f".{name}.link-{os.getpid()}"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(os.path.relpath(target, out_dir), tmp, target_is_directory=True)
    os.replace(tmp, dst)


class _Writer:
    """Builds the lines of one task from the world's imglish readers and writes them under ``out_dir``."""

    def __init__(self, world_dir: Path, out_dir: Path, tokenize: Callable[[str], list[int]],
                 skip: BadRecordCounter, vqa_min_count: int, vqa_rest_val: float, seed: int) -> None:
        from imglish.data.synthetic import load_world, world_paths

        self.world = world_dir
        self.out = out_dir
        self.paths = world_paths(world_dir)
        self.meta = load_world(world_dir)
        self.tokenize = tokenize
        self.skip = skip
        self.vqa_min_count = vqa_min_count
        self.vqa_rest_val = vqa_rest_val
        self.seed = seed
        self.written: list[Path] = []
        self.links: dict[str, Path] = {}  # out_dir entry -> world folder

    # helpers -------------------------------------------------------------------------------------------------------
    def _need(self, path: Path, fmt: str) -> Path:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: the world has no {fmt} data "
                                    f"(write it with `imglish data shapes --formats {fmt},...`)")
        return path

    def _rel(self, path: str | os.PathLike, root: Path) -> str:
        rel = Path(os.path.relpath(path, root))
        if rel.parts[0] == "..":
            raise ValueError(f"{path} is not below {root}")
        self.links[rel.parts[0]] = root / rel.parts[0]
        return rel.as_posix()

    def _ids(self, text: str, source: str, rid: Any) -> list[int] | None:
        try:
            ids = self.tokenize(text)
        except ValueError as err:
            self.skip.report(source, rid, "text not tokenizable", str(err))
            return None
        ids = list(ids)
        if not _is_ids(ids):
            raise TypeError(f"tokenize must return a list of ints, got {ids!r:.80} for {text!r}")
        if not ids:
            self.skip.report(source, rid, "text not tokenizable", f"no token ids for {text!r}")
            return None
        return ids

    def _records(self, ds: Any) -> Iterable[dict[str, Any]]:
        """Items of an imglish reader built with ``loader=str`` (``image`` is then the path, nothing is decoded)."""
        for i in range(len(ds)):
            rec = ds[i]
            if isinstance(rec, SkippedRecord):
                continue
            yield rec

    def _save(self, name: str, lines: list[dict[str, Any]]) -> None:
        self.written.append(_write_jsonl(self.out / name, lines))

    def _split_ids(self, split: str) -> set[int]:
        s = self.meta["splits"][split]
        return set(range(int(s["first_id"]), int(s["stop_id"])))

    # tasks ---------------------------------------------------------------------------------------------------------
    def imagenet(self) -> None:
        from imglish.data.imagenet import ImageFolderDataset

        train_dir = self._need(self.paths["imagenet_train"], "imagenet")
        val_dir = self._need(self.paths["imagenet_val"], "imagenet")
        # the official prefix: the longest common *character* prefix of the two folder names
        prefix = os.path.commonprefix([str(train_dir), str(val_dir)])
        if not prefix.endswith(os.sep):
            raise ValueError(f"{train_dir} and {val_dir} have no common parent folder prefix ({prefix!r})")
        root = Path(prefix)
        classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
        for split, folder in (("train", train_dir), ("val", val_dir)):
            ds = ImageFolderDataset(folder, classes=classes, skip=self.skip, loader=str)
            lines = [{"image_path": self._rel(rec["path"], root), "label": rec["label"]} for rec in self._records(ds)]
            self._save(official_index_files("imagenet", split)[0], lines)

    def nlvr2(self) -> None:
        from imglish.data.nlvr2 import NLVR2Dataset

        root = self._need(self.paths["nlvr2_dir"], "nlvr2")
        for split, fname in (("train", "train.json"), ("val", "dev.json"), ("test", "test1.json")):
            ds = NLVR2Dataset(self._need(root / fname, "nlvr2"), root=root, skip=self.skip, loader=str)
            lines = []
            for rec in self._records(ds):
                ids = self._ids(rec["text"], ds.source_name, rec["identifier"])
                if ids is None:
                    continue
                lines.append({"image_path": self._rel(rec["image"], root),
                              "image2_path": self._rel(rec["image2"], root), "text_segment": ids,
                              "label": rec["label"], "identifier": rec["identifier"]})
            self._save(official_index_files("nlvr2", split)[0], lines)

    def vqav2(self) -> None:
        from imglish.data.vqav2 import VQAv2Dataset, build_answer_vocab, save_answer_vocab

        vq = self._need(self.paths["vqav2_dir"], "vqav2")
        root = self._need(self.paths["coco_root"], "vqav2")
        train_q = self._need(vq / "v2_OpenEnded_mscoco_train2014_questions.json", "vqav2")
        train_a = self._need(vq / "v2_mscoco_train2014_annotations.json", "vqav2")
        val_q = self._need(vq / "v2_OpenEnded_mscoco_val2014_questions.json", "vqav2")
        val_a = self._need(vq / "v2_mscoco_val2014_annotations.json", "vqav2")
        vocab = build_answer_vocab([train_a], min_count=self.vqa_min_count)
        if not vocab:
            raise ValueError(f"no training answer occurs {self.vqa_min_count} times; lower vqa_min_count")
        self.written.append(save_answer_vocab(vocab, self.out / "answer2label.txt"))

        def lines_of(ds: VQAv2Dataset, labelled: bool) -> list[dict[str, Any]]:
            out = []
            for rec in self._records(ds):
                ids = self._ids(rec["text"], ds.source_name, rec["question_id"])
                if ids is None:
                    continue
                out.append({"image_path": self._rel(rec["image"], root), "text_segment": ids,
                            "labels": rec["labels"] if labelled else [],
                            "scores": rec["scores"] if labelled else [], "qid": rec["question_id"]})
            return out

        # train2014 = the world's train split; labelled lines with no answer in the vocabulary are dropped (official)
        train = VQAv2Dataset(train_q, train_a, root, vocab, skip=self.skip, loader=str)
        self._save("vqa.train.jsonl", lines_of(train, True))
        # the world's val split plays val2014: split by image into rest_val (evaluation) and trainable_val (training)
        val = lines_of(VQAv2Dataset(val_q, val_a, root, vocab, image_ids=self._split_ids("val"), skip=self.skip,
                                    loader=str), True)
        images = sorted({line["image_path"] for line in val})
        k = self.vqa_rest_val
        n_rest = int(k) if isinstance(k, int) and not isinstance(k, bool) else int(round(float(k) * len(images)))
        n_rest = min(len(images), max(1 if images else 0, n_rest))
        order = np.random.default_rng(self.seed).permutation(len(images))
        rest = {images[j] for j in order[:n_rest]}
        self._save("vqa.val.jsonl", val)
        self._save("vqa.trainable_val.jsonl", [line for line in val if line["image_path"] not in rest])
        self._save("vqa.rest_val.jsonl", [line for line in val if line["image_path"] in rest])
        # the world's test split plays test2015 (and test-dev): no answers, as in the official files
        test = lines_of(VQAv2Dataset(val_q, None, root, image_ids=self._split_ids("test"), skip=self.skip,
                                     loader=str), False)
        self._save("vqa.test.jsonl", test)
        self._save("vqa.test-dev.jsonl", test)

    def _retrieval(self, task: str, json_key: str, root_key: str, splits: Mapping[str, Sequence[str]]) -> None:
        from imglish.data.coco import KarpathyCaptions

        fmt = "coco" if task == "coco_retrieval" else "flickr30k"
        js = self._need(self.paths[json_key], fmt)
        root = self.paths[root_key]
        image_root = root if task == "coco_retrieval" else root / "flickr30k-images"
        for split, karpathy in splits.items():
            ds = KarpathyCaptions(js, image_root, splits=karpathy, per="caption", skip=self.skip, loader=str)
            lines = []
            for i, rec in enumerate(self._records(ds)):
                ids = self._ids(rec["text"], ds.source_name, f"{rec['image_id']}#{i}")
                if ids is None:
                    continue
                lines.append({"image_path": self._rel(rec["image_path"], root), "text_segment": ids,
                              "image_id": rec["image_index"]})
            self._save(official_index_files(task, split)[0], lines)

    def coco_retrieval(self) -> None:
        self._retrieval("coco_retrieval", "coco_karpathy", "coco_root",
                        {"train": ("train", "restval"), "val": ("val",), "test": ("test",)})

    def flickr30k(self) -> None:
        self._retrieval("flickr30k", "flickr30k_karpathy", "flickr30k_root",
                        {"train": ("train",), "val": ("val",), "test": ("test",)})

    def _captioning(self, names: Mapping[str, str]) -> None:
        from imglish.data.coco import KarpathyCaptions

        js = self._need(self.paths["coco_karpathy"], "coco")
        root = self.paths["coco_root"]
        for split, name in names.items():
            if split == "train":
                ds = KarpathyCaptions(js, root, splits=("train", "restval"), per="caption", skip=self.skip, loader=str)
                lines = []
                for i, rec in enumerate(self._records(ds)):
                    ids = self._ids(rec["text"], ds.source_name, f"{rec['image_id']}#{i}")
                    if ids is not None:
                        lines.append({"image_path": self._rel(rec["image_path"], root), "text_segment": ids,
                                      "image_id": rec["image_id"]})
            else:
                ds = KarpathyCaptions(js, root, splits=(split,), per="image", skip=self.skip, loader=str)
                lines = [{"image_path": self._rel(rec["image_path"], root), "text_segment": None,
                          "image_id": rec["image_id"]} for rec in self._records(ds)]
            self._save(name, lines)

    def coco_captioning(self) -> None:
        self._captioning({s: f"coco_captioning.{s}.jsonl" for s in ("train", "val", "test")})

    def nocaps(self) -> None:
        # the world has no NoCaps: its val/test stand-ins are the COCO val/test images (COCO paths, cocoid as id)
        self._captioning({"train": "coco_captioning.train.jsonl", "val": "nocaps.val.jsonl",
                          "test": "nocaps.test.jsonl"})

    def finish(self) -> None:
        for name, target in sorted(self.links.items()):
            _link(self.out, name, target)


def write_official_index(
    world_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    task: str,
    tokenize: Callable[[str], list[int]] | Any,
    *,
    vqa_min_count: int = 9,
    vqa_rest_val: int | float = 0.5,
    seed: int = 0,
    skip: BadRecordCounter | None = None,
) -> list[Path]:
    """Write the official index files of ``task``, every split, from a world made by ``imglish data shapes``.

    **Data root.** ``out_dir`` becomes a complete official ``--data_path`` for the task: the index files are written
    into it and the image paths of the lines have the official form (``train2014/COCO_train2014_....jpg``,
    ``images/train/<dir>/...-img0.png``, ``flickr30k-images/<id>.jpg``, ``train/<class>/<id>.JPEG``), relative to
    ``out_dir``, where a relative symbolic link leads each top-level folder (``train2014``, ``val2014``, ``images``,
    ``flickr30k-images``, ``train``, ``val``) to the world's folder. So, for every task,
    ``OfficialIndexDataset(official_index_files(task, split), data_root=out_dir, task=task)`` reads back what was
    written (and the official code runs with ``--data_path out_dir``). Several tasks can share one ``out_dir``; their
    folder names do not collide. Existing links to the same folders are kept; a real folder of another content with
    one of those names is an error.

    What is written (spec §6), read from the world with the imglish readers:

    * ``imagenet``: ``imagenet.{train,val}.index.jsonl``; ``image_path`` relative to the longest common character
      prefix of ``imagenet/train`` and ``imagenet/val`` (so ``train/...``, ``val/...``), ``label`` = index of the class
      folder in sorted order. The world's ``imagenet/test`` is not used (the official test set is val).
    * ``nlvr2``: ``nlvr2.{train,dev,test-P}.index.jsonl`` from ``train.json``, ``dev.json``, ``test1.json``.
    * ``vqav2``: ``answer2label.txt`` from the normalised training answers seen at least ``vqa_min_count`` times
      (:func:`~imglish.data.vqav2.build_answer_vocab`; the official rule counts 9 over train2014 + val2014);
      ``vqa.train.jsonl`` = the world's train split (train2014); the world's val split plays val2014:
      ``vqa.val.jsonl`` holds all of it, split by image into ``vqa.rest_val.jsonl`` (``vqa_rest_val`` images: an int
      is a count, official 1000; a float a fraction) and ``vqa.trainable_val.jsonl`` (the rest), the images drawn
      with ``numpy.random.default_rng(seed)`` (the official draw is unseeded); the world's test split plays
      test2015: ``vqa.test.jsonl`` = ``vqa.test-dev.jsonl``, with ``labels``/``scores`` empty. Labelled questions
      with no answer in the vocabulary are dropped (counted in ``skip``), as officially.
    * ``coco_retrieval``: ``coco_retrieval.{train,val,test}.jsonl`` (train = Karpathy train + restval), one line per
      caption, ``image_id`` = sequential index of the image within the split.
    * ``flickr30k``: ``flickr30k.{train,val,test}.jsonl``, likewise.
    * ``coco_captioning``: ``coco_captioning.train.jsonl`` (one line per caption, ``image_id`` = cocoid) and
      ``coco_captioning.{val,test}.jsonl`` (one line per image, ``text_segment: null``).
    * ``nocaps``: the world has no NoCaps; ``nocaps.{val,test}.jsonl`` are written from the COCO val/test images as
      stand-ins (COCO paths, ``image_id`` = cocoid, ``text_segment: null``), plus ``coco_captioning.train.jsonl``,
      the NoCaps training file.

    Args:
        world_dir: the world folder.
        out_dir: where the index files (and the image links) go; created if needed.
        task: one of :data:`OFFICIAL_TASKS`.
        tokenize: ``str -> list[int]`` giving ids **without** BOS/EOS; an object with ``tokenize`` and
            ``convert_tokens_to_ids`` (a :class:`~imglish.tokenizers.text.TextTokenizer`) is used as the official
            code does: ``convert_tokens_to_ids(tokenize(raw))``.
        vqa_min_count: least count of an answer in the vocabulary (9 officially; smaller for small worlds).
        vqa_rest_val: size of ``rest_val`` in images (int) or as a fraction of the val split's images (float).
        seed: seed of the rest_val draw.
        skip: counter for the records the world's readers (or the tokenizer) reject; a fresh one if None.

    Returns:
        the files written (each atomically: temporary file, then rename), in writing order.

    Raises:
        ValueError: on an unknown task, or a VQA vocabulary that would be empty.
        FileNotFoundError: if the world lacks the data of the task.
    """
    _check_task(task)
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _Writer(world_dir, out_dir, _tokenizer_fn(tokenize), skip if skip is not None else BadRecordCounter(),
                     int(vqa_min_count), vqa_rest_val, int(seed))
    getattr(writer, task)()
    writer.finish()
    return writer.written
