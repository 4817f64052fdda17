"""VQAv2: the official questions/annotations JSON files, answer normalisation, vocabulary and soft scores.

Conventions of the official BEiT-3 code (spec §6, after ViLT):

* the answer vocabulary is every ``multiple_choice_answer`` of the training annotations, normalised with
  :func:`normalize_answer`, that occurs at least 9 times, numbered in order of first occurrence (3129 classes on
  VQAv2 train2014 + val2014);
* per question, the ten human answers are counted **as raw strings** (``normalize_answers=False``, the official
  behaviour) and only strings in the vocabulary are kept; ``normalize_answers=True`` normalises them first;
* soft scores: ``"vilt"`` gives 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / 4+ matching answers (the official
  approximation); ``"vqa"`` gives the standard ``min(1, n / 3)``.

Files: ``v2_OpenEnded_mscoco_<subtype>_questions.json`` (``{"data_subtype", "questions": [{"image_id", "question",
"question_id"}]}``) and ``v2_mscoco_<subtype>_annotations.json`` (``{"annotations": [{"question_id", "image_id",
"multiple_choice_answer", "answers": [{"answer", ...}] * 10, ...}]}``). Images live at
``<image_root>/<subtype>/COCO_<subtype>_<image_id:012d>.jpg``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from imglish.data.base import RecordDataset, Tokenizer, Transform
from imglish.data.skip import BadRecordCounter, SkippedRecord

__all__ = [
    "VQAv2Dataset",
    "answer_scores",
    "build_answer_vocab",
    "load_answer_vocab",
    "normalize_answer",
    "save_answer_vocab",
    "score_from_count",
    "vqa_image_path",
]

# Punctuation of the VQA evaluation: deleted when next to a space, otherwise turned into a space.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Common contractions written without the apostrophe (a subset of the evaluation's list).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "hows": "how's", "id": "i'd", "im": "i'm",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've", "lets": "let's", "mightnt": "mightn't",
    "mustnt": "mustn't", "shes": "she's", "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "whens": "when's", "wheres": "where's",
    "whos": "who's", "whys": "why's", "wont": "won't", "wouldnt": "wouldn't", "wouldve": "would've",
    "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_answer(answer: str) -> str:
    """Normalise a VQA answer the way the VQA evaluation does.

    Lower-cases; removes punctuation that touches a space (or everything of the list when the text has a digit
    comma like ``1,000``) and turns the rest into spaces; removes periods that are not decimal points; maps number
    words to digits (``"two"`` to ``"2"``, ``"none"`` to ``"0"``); drops articles; restores common contractions.

    Args:
        answer: raw answer.

    Returns:
        the normalised answer (single spaces, stripped).
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    has_digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text)
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def _annotations(source: str | os.PathLike | Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> list[dict]:
    if isinstance(source, (str, os.PathLike)):
        data = json.loads(Path(source).read_text())
        return list(data["annotations"])
    if isinstance(source, Mapping):
        return list(source["annotations"])
    return list(source)


def build_answer_vocab(
    sources: Sequence[str | os.PathLike | Mapping[str, Any]],
    min_count: int = 9,
) -> list[str]:
    """The answer vocabulary: normalised ``multiple_choice_answer`` strings seen at least ``min_count`` times.

    Args:
        sources: annotation files (or loaded annotation dicts), in order (official: train2014 then val2014).
        min_count: least number of occurrences (9 in the official code).

    Returns:
        answers in order of first occurrence; the label of an answer is its position.
    """
    counts: Counter[str] = Counter()
    for src in sources:
        for ann in _annotations(src):
            counts[normalize_answer(ann["multiple_choice_answer"])] += 1
    return [a for a, n in counts.items() if n >= min_count]  # Counter keeps first-insertion order


def save_answer_vocab(vocab: Sequence[str], path: str | os.PathLike) -> Path:
    """Write ``answer2label.txt`` (JSON lines ``{"answer": ..., "label": i}``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps({"answer": a, "label": i}) + "\n" for i, a in enumerate(vocab)))
    os.replace(tmp, path)
    return path


def load_answer_vocab(path: str | os.PathLike) -> list[str]:
    """Read ``answer2label.txt``; raises ``ValueError`` if labels are not 0..n-1 in order."""
    vocab = []
    for n, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec["label"] != len(vocab):
            raise ValueError(f"{path}: line {n + 1} has label {rec['label']}, expected {len(vocab)}")
        vocab.append(rec["answer"])
    return vocab


def score_from_count(n: int, mode: str = "vilt") -> float:
    """Soft score of an answer given by ``n`` of the ten annotators.

    Args:
        n: number of matching human answers.
        mode: ``"vilt"`` (0, 0.3, 0.6, 0.9, then 1.0) or ``"vqa"`` (``min(1, n / 3)``).
    """
    if mode == "vilt":
        return (0.0, 0.3, 0.6, 0.9)[n] if n < 4 else 1.0
    if mode == "vqa":
        return min(1.0, n / 3.0)
    raise ValueError(f"score mode must be 'vilt' or 'vqa', got {mode!r}")


def answer_scores(
    answers: Sequence[str],
    answer2label: Mapping[str, int],
    mode: str = "vilt",
    normalize: bool = False,
) -> dict[int, float]:
    """Soft targets of one question.

    Args:
        answers: the (ten) human answers.
        answer2label: vocabulary mapping.
        mode: ``"vilt"`` or ``"vqa"`` (see :func:`score_from_count`).
        normalize: normalise the human answers before counting (the official code does not).

    Returns:
        ``{label: score}`` for the answers present in the vocabulary (empty if none is).
    """
    counts = Counter(normalize_answer(a) if normalize else a for a in answers)
    return {answer2label[a]: score_from_count(n, mode) for a, n in counts.items() if a in answer2label}


def vqa_image_path(image_root: str | os.PathLike, subtype: str, image_id: int) -> Path:
    """``<image_root>/<subtype>/COCO_<subtype>_<image_id:012d>.jpg``."""
    return Path(image_root) / subtype / f"COCO_{subtype}_{int(image_id):012d}.jpg"


class VQAv2Dataset(RecordDataset):
    """Question records from VQAv2 files.

    Args:
        questions: the questions JSON.
        annotations: the annotations JSON, or None (test sets: records carry no targets).
        image_root: folder holding ``<subtype>/COCO_<subtype>_....jpg`` (the COCO root).
        vocab: answer vocabulary (list, position = label) or None (records then have no ``labels``/``scores``).
        score: ``"vilt"`` (official) or ``"vqa"``.
        normalize_answers: normalise human answers before counting (official: False).
        image_ids: keep only questions about these images (e.g. one split of the synthetic world).
        drop_unanswerable: skip questions none of whose answers is in the vocabulary (counted as
            ``"answer outside vocabulary"``); the official training set drops them. Keep them for evaluation.
        transform, tokenizer, skip, loader: see :class:`~imglish.data.base.RecordDataset`.

    Records: ``image``, ``text`` (the question) [, ``text_ids``], ``question_id``, ``image_id``, ``answers`` (raw,
    may be empty), and with a vocabulary ``labels`` (list of int), ``scores`` (list of float) and ``target``
    (float tensor of the vocabulary size).

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: if a file is not in the VQAv2 layout.
    """

    source_name = "vqav2"

    def __init__(
        self,
        questions: str | os.PathLike,
        annotations: str | os.PathLike | None,
        image_root: str | os.PathLike,
        vocab: Sequence[str] | None = None,
        score: str = "vilt",
        normalize_answers: bool = False,
        image_ids: Iterable[int] | None = None,
        drop_unanswerable: bool = True,
        transform: Transform | None = None,
        tokenizer: Tokenizer | None = None,
        skip: BadRecordCounter | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(transform, tokenizer, skip, **kwargs)
        score_from_count(1, score)  # validates the mode
        qpath = Path(questions)
        if not qpath.is_file():
            raise FileNotFoundError(f"VQAv2 questions file {qpath} does not exist")
        self.source_name = qpath.name
        qdata = json.loads(qpath.read_text())
        if "questions" not in qdata:
            raise ValueError(f"{qpath}: not a VQAv2 questions file (no 'questions')")
        self.subtype = qdata.get("data_subtype")
        if not self.subtype:
            raise ValueError(f"{qpath}: no 'data_subtype' (e.g. 'train2014'); it names the image folder")
        self.image_root = Path(image_root)
        self.vocab = list(vocab) if vocab is not None else None
        self.answer2label = {a: i for i, a in enumerate(self.vocab)} if self.vocab is not None else None
        self.score = score
        anns: dict[int, dict[str, Any]] = {}
        if annotations is not None:
            apath = Path(annotations)
            if not apath.is_file():
                raise FileNotFoundError(f"VQAv2 annotations file {apath} does not exist")
            for ann in _annotations(apath):
                anns[int(ann["question_id"])] = ann
        keep = set(int(i) for i in image_ids) if image_ids is not None else None
        self.items: list[dict[str, Any]] = []
        for n, q in enumerate(qdata["questions"]):
            try:
                qid, image_id, text = int(q["question_id"]), int(q["image_id"]), q["question"]
            except (KeyError, TypeError, ValueError) as err:
                self.skip.report(self.source_name, f"questions[{n}]", "malformed record", repr(err))
                continue
            if keep is not None and image_id not in keep:
                continue
            if self._empty_text(text):
                self.skip.report(self.source_name, qid, "empty text")
                continue
            item: dict[str, Any] = {"question_id": qid, "image_id": image_id, "text": text.strip(), "answers": []}
            if annotations is not None:
                ann = anns.get(qid)
                if ann is None:
                    self.skip.report(self.source_name, qid, "no annotation")
                    continue
                item["answers"] = [a["answer"] for a in ann.get("answers", [])]
            if self.answer2label is not None and annotations is not None:
                sc = answer_scores(item["answers"], self.answer2label, score, normalize_answers)
                if not sc and drop_unanswerable:
                    self.skip.report(self.source_name, qid, "answer outside vocabulary",
                                     f"answers {sorted(set(item['answers']))}")
                    continue
                item["labels"], item["scores"] = list(sc.keys()), list(sc.values())
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def image_path(self, image_id: int) -> Path:
        """Path of the image file of ``image_id``."""
        return vqa_image_path(self.image_root, self.subtype, image_id)

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedRecord:
        item = self.items[i]
        img = self._image(self.image_path(item["image_id"]), item["question_id"])
        if isinstance(img, SkippedRecord):
            return img
        fields = self._text_fields(item["text"], item["question_id"])
        if isinstance(fields, SkippedRecord):
            return fields
        rec: dict[str, Any] = {"image": img, **fields, "question_id": item["question_id"],
                               "image_id": item["image_id"], "answers": list(item["answers"])}
        if "labels" in item:
            rec["labels"], rec["scores"] = list(item["labels"]), list(item["scores"])
            target = torch.zeros(len(self.vocab), dtype=torch.float32)
            if item["labels"]:
                target[torch.tensor(item["labels"])] = torch.tensor(item["scores"], dtype=torch.float32)
            rec["target"] = target
        return rec
