"""``vqav2``: visual question answering as multi-label classification over an answer vocabulary
(``BEiT3ForVisualQuestionAnswering``; spec §2.2, §6, §8).

* data, in order of preference:

  1. the official index files in ``DIR`` (``vqa.train.jsonl`` + ``vqa.trainable_val.jsonl``, ``vqa.rest_val.jsonl``,
     ``vqa.test.jsonl``, and ``answer2label.txt``), read with :class:`~imglish.data.official.OfficialIndexDataset`;
  2. the VQAv2 JSON files ``DIR/vqav2/v2_OpenEnded_mscoco_<subtype>_questions.json`` and
     ``v2_mscoco_<subtype>_annotations.json`` with the images under ``DIR/coco/<subtype>/`` (``DIR`` itself when it
     has no ``coco`` folder). In a world from ``imglish data shapes`` (``DIR/world.json``) train = train2014, and the
     val and test splits are the val2014 questions about the images of the world's val and test id ranges. In a real
     VQAv2 folder (no ``world.json``) train = train2014, val = all of val2014, and test = the test2015 questions
     (``v2_OpenEnded_mscoco_test2015_questions.json``, no answers: predictions are written, nothing is scored);

* answer vocabulary: the normalised ``multiple_choice_answer`` strings of the training split seen at least
  ``task.answer_min_count`` times (:func:`~imglish.data.vqav2.build_answer_vocab`; 3129 answers on VQAv2 with 9;
  the official vocabulary also counts val2014), or ``answer2label.txt`` with the index files. It is the task's
  :attr:`~imglish.tasks.Task.state` (``{"answers": [...]}``), saved in ``OUT/task.json`` by ``finetune`` and read back
  by evaluation, so a model is always decoded with the vocabulary it was trained on;
* training: the VQA transform (random resized crop, flip, RandAugment as the recipe says), the question, and the
  soft target over the vocabulary (ViLT scores 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / 4+ matching raw human
  answers, :func:`~imglish.data.vqav2.answer_scores`). Questions none of whose answers is in the vocabulary are
  dropped from training and counted (``"answer outside vocabulary"``), as officially. Loss: binary cross-entropy
  with logits summed over the answers of each question (the official ``BCEWithLogitsLoss() * num_classes``),
  term ``vqa``; its ``correct`` is the soft score of the argmax answer (the official ``VQAScore``);
* evaluation: the argmax answer of each question. The predictions file is the EvalAI submission
  ``[{"question_id", "answer"}]``; it is scored with the official VQA accuracy against the ten human answers
  (:func:`imglish.evaluation.metrics.vqa_accuracy`), key ``vqa_accuracy``. The official index files keep only the
  soft scores, not the human answers: there ``vqa_accuracy`` is the official ``VQAScore`` (the soft score of the
  predicted answer, as the official code reports on ``rest_val``). Questions without any human answer in an
  answered split are skipped and counted (``"no answers"``); a split without answers (test) cannot be scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imglish.tasks.base import Task, register_task

__all__ = ["VQAv2Task"]

_SUBTYPE = {"train": "train2014", "val": "val2014", "test": "val2014"}


def _replay(records: Sequence[Any], skip: Any) -> None:
    """Count, in ``skip``, the records a cached reader skipped while building its index (raises when strict)."""
    if skip is None:
        return
    for rec in records:
        skip.report(rec.source, rec.record_id, rec.reason, rec.detail)


@register_task
class VQAv2Task(Task):
    """VQAv2 (see the module docstring)."""

    name = "vqav2"
    model_task = "vqav2"
    transform_task = "vqav2"
    terms = ("vqa",)
    main_metric = "vqa_accuracy"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (split, training view) -> (reader, what its index skipped, whether the split has answers): read once
        self._cache: dict[tuple[str, bool], tuple[Any, list[Any], bool]] = {}

    # ----------------------------------------------------------------------------------------- where the data is
    @property
    def root(self) -> Path:
        if self.data_dir is None:
            raise ValueError("task vqav2 needs a data folder (data.path)")
        return Path(self.data_dir)

    def _official(self, split: str) -> list[Path] | None:
        from imglish.data.official import official_index_files

        files = [self.root / f for f in official_index_files(self.name, split)]
        return files if all(f.is_file() for f in files) else None

    def _vqa_dir(self) -> Path:
        for cand in (self.root / "vqav2", self.root):
            if (cand / "v2_OpenEnded_mscoco_train2014_questions.json").is_file() or \
                    (cand / "v2_OpenEnded_mscoco_val2014_questions.json").is_file():
                return cand
        raise FileNotFoundError(
            f"no VQAv2 data under {str(self.root)!r}: expected vqav2/v2_OpenEnded_mscoco_<train2014|val2014>_"
            "questions.json with its v2_mscoco_<subtype>_annotations.json (a world from `imglish data shapes`, or "
            "the VQAv2 files), or the official index files (vqa.train.jsonl, vqa.trainable_val.jsonl, "
            "vqa.rest_val.jsonl, answer2label.txt)"
        )

    def _image_root(self) -> Path:
        coco = self.root / "coco"
        return coco if coco.is_dir() else self.root

    def _is_world(self) -> bool:
        return (self.root / "world.json").is_file()

    def _json_files(self, split: str) -> tuple[Path, Path | None, set[int] | None]:
        """``(questions, annotations or None, image ids to keep or None)`` of a split in the JSON layout."""
        vq = self._vqa_dir()
        if split == "test" and not self._is_world():
            q = vq / "v2_OpenEnded_mscoco_test2015_questions.json"
            if not q.is_file():
                raise FileNotFoundError(
                    f"{q} does not exist: the VQAv2 test split is the test2015 questions (no answers; submit the "
                    "predictions to EvalAI)"
                )
            return q, None, None
        subtype = _SUBTYPE[split]
        q = vq / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
        a = vq / f"v2_mscoco_{subtype}_annotations.json"
        for f in (q, a):
            if not f.is_file():
                raise FileNotFoundError(f"{f} does not exist: the VQAv2 {split} split needs the {subtype} questions "
                                        "and annotations")
        ids = None
        if self._is_world() and split in ("val", "test"):
            from imglish.data.synthetic import load_world

            s = load_world(self.root)["splits"][split]
            ids = set(range(int(s["first_id"]), int(s["stop_id"])))
        return q, a, ids

    # ----------------------------------------------------------------------------------------- vocabulary
    @property
    def answers(self) -> list[str]:
        """The answer vocabulary (label = position); built from the training split on first use."""
        if "answers" not in self.state:
            path = self.root / "answer2label.txt"
            official = [s for s in self.splits if self._official(s) is not None]
            if "train" in official or (official and path.is_file()):
                from imglish.data.vqav2 import load_answer_vocab

                if not path.is_file():
                    raise FileNotFoundError(f"{path} does not exist: the official VQAv2 index files need their "
                                            "answer vocabulary (answer2label.txt)")
                vocab = load_answer_vocab(path)
                where = str(path)
            else:
                from imglish.data.vqav2 import build_answer_vocab

                _, ann, _ = self._json_files("train")
                vocab = build_answer_vocab([ann], min_count=self.cfg.task.answer_min_count)
                where = f"{ann} (task.answer_min_count={self.cfg.task.answer_min_count})"
            if not vocab:
                raise ValueError(f"vqav2: empty answer vocabulary from {where}; lower task.answer_min_count")
            self.state["answers"] = list(vocab)
        answers = self.state["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError("vqav2 task state 'answers' must be a non-empty list of answer strings")
        return answers

    @property
    def num_classes(self) -> int:
        return len(self.answers)

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def answer_prior(self) -> torch.Tensor:
        """Mean soft target of each answer over the training questions (read from the index, no image)."""
        total = torch.zeros(self.num_classes, dtype=torch.float64)
        ds, _, _ = self._reader("train", train=True)
        for it in ds.items:
            if it.get("labels"):
                total[torch.tensor(it["labels"], dtype=torch.long)] += torch.tensor(it["scores"], dtype=torch.float64)
        return (total / max(len(ds.items), 1)).float()

    @torch.no_grad()
    def init_head(self, model: nn.Module) -> None:
        """With ``task.head_bias_prior``: the answer logits' bias at the log-odds of :meth:`answer_prior`."""
        if not self.cfg.task.head_bias_prior:
            return
        p = self.answer_prior().clamp(1e-4, 1 - 1e-4)
        model.head[-1].bias.copy_(torch.log(p / (1 - p)))

    # ----------------------------------------------------------------------------------------- data
    def _reader(self, split: str, train: bool) -> tuple[Any, list[Any], bool]:
        """The split's reader (cached), the records its index skipped, and whether the split has answers.

        ``train`` gives the training view: questions with soft targets, the unanswerable ones dropped. Otherwise
        every question with human answers is kept (those without any are skipped as ``"no answers"``).
        """
        from imglish.data.skip import BadRecordCounter

        key = (split, train)
        if key in self._cache:
            return self._cache[key]
        own = BadRecordCounter()
        files = self._official(split)
        if files is not None:
            from imglish.data.official import OfficialIndexDataset

            ds = OfficialIndexDataset([str(f) for f in files], self.root, self.name, skip=own,
                                      answer2label=self.answers)
            has_answers = any("labels" in it for it in ds.items)
            if has_answers:
                kept = []
                for it in ds.items:
                    if "labels" in it:
                        kept.append(it)
                    else:
                        own.report(it["source"], it["question_id"], "answer outside vocabulary" if train
                                   else "no answers", "no labels on the line")
                ds.items = kept
        else:
            from imglish.data.vqav2 import VQAv2Dataset

            q, a, ids = self._json_files(split)
            vocab = self.answers if train else None
            ds = VQAv2Dataset(q, a, self._image_root(), vocab=vocab, image_ids=ids, drop_unanswerable=True,
                              skip=own)
            has_answers = a is not None
            if has_answers and not train:
                kept = []
                for it in ds.items:
                    if it["answers"]:
                        kept.append(it)
                    else:
                        own.report(ds.source_name, it["question_id"], "no answers", "the annotation has no answers")
                ds.items = kept
        if train and not has_answers:
            raise ValueError(f"vqav2: the {split} split has no answers to train on")
        self._cache[key] = (ds, own.records(), has_answers)
        return self._cache[key]

    def dataset(self, split: str, skip: Any) -> Sequence[Any]:
        """The training view of ``train`` (soft targets), the evaluation view of ``val``/``test``."""
        self.check_split(split)
        ds, skipped, _ = self._reader(split, train=split == "train")
        _replay(skipped, skip)
        if skip is not None:
            ds.skip = skip
        return ds

    def eval_sets(self, split: str, skip: Any) -> dict[str, Sequence[Any]]:
        self.check_split(split)
        ds, skipped, _ = self._reader(split, train=False)
        _replay(skipped, skip)
        if skip is not None:
            ds.skip = skip
        return {"records": ds}

    def _target(self, record: Mapping[str, Any]) -> torch.Tensor:
        target = torch.zeros(self.num_classes, dtype=torch.float32)
        labels = record.get("labels") or []
        if labels:
            target[torch.tensor(labels, dtype=torch.long)] = torch.tensor(record["scores"], dtype=torch.float32)
        return target

    def sample(self, record: Any, seed: int | None, train: bool) -> dict[str, Any]:
        ids, pad = self.text(record)
        out: dict[str, Any] = {"image": self.seeded_image(record["image"], seed, train), "question": ids,
                               "padding_mask": pad}
        if train:
            if not record.get("labels"):
                raise ValueError(f"vqav2 question {record.get('question_id')!r} has no answer in the vocabulary")
            out["target"] = self._target(record)
        else:
            out["question_id"] = int(record["question_id"])
        return out

    # ----------------------------------------------------------------------------------------- loss
    def loss_terms(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], step: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        logits = model(image=batch["image"], question=batch["question"], padding_mask=batch["padding_mask"]).float()
        target = batch["target"].float()
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        best = logits.detach().argmax(-1, keepdim=True)
        correct = target.gather(1, best).sum()  # the official VQAScore: soft score of the argmax answer
        return {"vqa": (loss, correct)}

    # ----------------------------------------------------------------------------------------- evaluation
    def predict(self, model: nn.Module, set_name: str, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        logits = model(image=batch["image"], question=batch["question"], padding_mask=batch["padding_mask"])
        best = logits.float().argmax(-1).cpu().tolist()
        answers = self.answers
        return [
            {"index": int(i), "question_id": int(q), "answer": answers[b]}
            for i, q, b in zip(batch["index"].tolist(), batch["question_id"], best)
        ]

    def predictions(self, records: Mapping[str, list[dict[str, Any]]], split: str) -> list[dict[str, Any]]:
        """The EvalAI submission: ``[{"question_id", "answer"}]`` in record order."""
        return [{"question_id": r["question_id"], "answer": r["answer"]} for r in records["records"]]

    def has_answers(self, split: str) -> bool:
        """Whether ``split`` has human answers (or official soft scores) to score predictions against."""
        self.check_split(split)
        return self._reader(split, train=False)[2]

    def ground_truth(self, split: str, skip: Any) -> dict[int, Any]:
        """``{question_id: [human answers]}`` (JSON layout) or ``{question_id: {answer: soft score}}`` (official
        index files, which keep only the scores).

        Raises:
            ValueError: for a split without answers (test2015, ``vqa.test.jsonl``).
        """
        self.check_split(split)
        from imglish.data.official import OfficialIndexDataset

        ds, skipped, has_answers = self._reader(split, train=False)
        _replay(skipped, skip)
        if not has_answers:
            raise ValueError(
                f"vqav2: the {split} split of {str(self.root)!r} has no answers, so predictions on it cannot be "
                "scored here (submit predictions.json to the VQA EvalAI server)"
            )
        if isinstance(ds, OfficialIndexDataset):  # official index files: labels and soft scores
            answers = self.answers
            return {int(it["question_id"]): {answers[lab]: float(s) for lab, s in zip(it["labels"], it["scores"])}
                    for it in ds.items}
        return {int(it["question_id"]): list(it["answers"]) for it in ds.items}

    def evaluate_records(
        self, records: Mapping[str, list[dict[str, Any]]], split: str, skip: Any
    ) -> tuple[Any, dict[str, float]]:
        """As the base class, except that a split without answers gives its predictions and no metrics."""
        preds = self.predictions(records, split)
        if not self.has_answers(split):
            return preds, {}
        return preds, self.score(preds, self.ground_truth(split, skip), allow_missing=True)

    def score(self, predictions: Any, ground_truth: Mapping[int, Any], allow_missing: bool = False) -> dict[str, float]:
        """``{"vqa_accuracy": ...}`` (percent) of ``[{"question_id", "answer"}]``.

        Against human answers this is the official VQA accuracy; against official soft scores, the official
        ``VQAScore`` (the soft score of each predicted answer, averaged).

        Raises:
            ValueError: for a malformed file, a non-string answer, unknown question ids, or (unless
                ``allow_missing``) question ids of the split without a prediction.
        """
        from imglish.evaluation.metrics import vqa_accuracy
        from imglish.tasks.scoring import check_ids, records_by

        preds = records_by(predictions, "question_id", ("answer",), self.name)
        check_ids(preds, ground_truth, "question_id", self.name, allow_missing)
        keys = [k for k in ground_truth if k in preds]
        if not keys:
            raise ValueError(f"{self.name}: nothing to score (no prediction)")
        for k in keys:
            if not isinstance(preds[k]["answer"], str):
                raise ValueError(  # noqa: TRY004 - a malformed file, like the other checks of records_by
                    f"{self.name} prediction for question_id {k!r}: 'answer' must be a string, got "
                    f"{preds[k]['answer']!r}"
                )
        if isinstance(ground_truth[keys[0]], Mapping):
            total = sum(float(ground_truth[k].get(preds[k]["answer"], 0.0)) for k in keys)
            return {"vqa_accuracy": 100.0 * total / len(keys)}
        return {"vqa_accuracy": vqa_accuracy([preds[k]["answer"] for k in keys], [ground_truth[k] for k in keys])}

    def state_dict(self) -> dict[str, Any]:
        """``{"answers": [...]}``: the vocabulary the model's classes stand for."""
        return {"answers": list(self.answers)}
