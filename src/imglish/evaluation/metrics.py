"""Pure metric functions for the BEiT-3 downstream tasks, reported in percent as the official code reports them.

* VQA: :func:`vqa_accuracy` / :func:`vqa_scores`, the accuracy of the official VQA evaluation (GT-Vision-Lab
  ``vqaEval.py``), with its answer processing in :func:`process_punctuation` and :func:`process_digit_article`.
* Retrieval: :func:`retrieval_recall`, image-to-text (``tr_r{k}``) and text-to-image (``ir_r{k}``) recall at k and
  their mean, as ``RetrievalHandler.after_eval`` computes them (spec §8).
* Classification: :func:`topk_accuracy` (ImageNet, timm's ``accuracy(topk=(1, 5))``) and :func:`accuracy`
  (NLVR2: argmax against the label).

Captioning metrics live in :mod:`imglish.evaluation.captions`.

Ties. Retrieval and top-k accuracy rank the correct candidate *pessimistically*: a candidate that scores exactly as
high as the correct one is counted as ranked before it. So a hit at k means that fewer than k wrong candidates score
at least as high as the best correct one. With distinct scores this is what ``torch.topk`` gives; with ties the
official ``torch.topk`` order is unspecified, while this rule is deterministic and never rewards a model for ties
(a model whose scores are all equal gets recall 0 wherever k is smaller than the number of wrong candidates,
instead of an arbitrary or perfect number).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "process_digit_article",
    "process_punctuation",
    "retrieval_recall",
    "topk_accuracy",
    "vqa_accuracy",
    "vqa_scores",
]

# ---------------------------------------------------------------------------------------------------------------
# VQA answer processing (the rules of the official VQA evaluation)
# ---------------------------------------------------------------------------------------------------------------

# Characters that the evaluation deletes when they touch a space (or when the text has a digit-comma-digit group)
# and otherwise turns into a space. Note that neither "." (handled by _PERIOD_STRIP), "'" nor ":" is in the list.
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

# A comma between two digits ("1,000"): its presence makes every character of _PUNCT be deleted.
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")

# A period not followed by a digit is deleted. The evaluation writes this pattern as "(?!<=\d)(\.)(?!\d)"; its
# first group is a negative *lookahead* for the text "<=<digit>" (a mistyped lookbehind), which can never match
# where a "." stands, so the pattern is exactly "\.(?!\d)": "2." loses its period, "2.5" and ".5" keep theirs.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")

# The evaluation passes re.UNICODE (= 32) as the third positional argument of Pattern.sub, which is `count`: at
# most 32 periods are removed from one answer. Kept for exactness; no real answer has more.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

# Number words mapped to digits (the evaluation's "manualMap"), applied per word before the article check.
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# Contractions written without (or with misplaced) apostrophes, mapped to their spelling in the evaluation, as
# "written=normalised" pairs. Four keys of the evaluation's table start with a capital ("Id've", "I'dve", "Im",
# "Ive"); since the words are lower-cased before the lookup they can never match (so "im" stays "im"), and they
# are kept only to make the table complete. The odd entries "let's"/"she's" (identity) and "somebody'd" ->
# "somebodyd" are the evaluation's too.
_CONTRACTION_PAIRS = """
    aint=ain't  arent=aren't  cant=can't  couldve=could've  couldnt=couldn't  couldn'tve=couldn't've
    couldnt've=couldn't've  didnt=didn't  doesnt=doesn't  dont=don't  hadnt=hadn't  hadnt've=hadn't've
    hadn'tve=hadn't've  hasnt=hasn't  havent=haven't  hed=he'd  hed've=he'd've  he'dve=he'd've  hes=he's
    howd=how'd  howll=how'll  hows=how's  Id've=I'd've  I'dve=I'd've  Im=I'm  Ive=I've  isnt=isn't  itd=it'd
    itd've=it'd've  it'dve=it'd've  itll=it'll  let's=let's  maam=ma'am  mightnt=mightn't  mightnt've=mightn't've
    mightn'tve=mightn't've  mightve=might've  mustnt=mustn't  mustve=must've  neednt=needn't  notve=not've
    oclock=o'clock  oughtnt=oughtn't  ow's'at='ow's'at  'ows'at='ow's'at  'ow'sat='ow's'at  shant=shan't
    shed've=she'd've  she'dve=she'd've  she's=she's  shouldve=should've  shouldnt=shouldn't
    shouldnt've=shouldn't've  shouldn'tve=shouldn't've  somebody'd=somebodyd  somebodyd've=somebody'd've
    somebody'dve=somebody'd've  somebodyll=somebody'll  somebodys=somebody's  someoned=someone'd
    someoned've=someone'd've  someone'dve=someone'd've  someonell=someone'll  someones=someone's
    somethingd=something'd  somethingd've=something'd've  something'dve=something'd've  somethingll=something'll
    thats=that's  thered=there'd  thered've=there'd've  there'dve=there'd've  therere=there're  theres=there's
    theyd=they'd  theyd've=they'd've  they'dve=they'd've  theyll=they'll  theyre=they're  theyve=they've
    twas='twas  wasnt=wasn't  wed've=we'd've  we'dve=we'd've  weve=we've  werent=weren't  whatll=what'll
    whatre=what're  whats=what's  whatve=what've  whens=when's  whered=where'd  wheres=where's  whereve=where've
    whod=who'd  whod've=who'd've  who'dve=who'd've  wholl=who'll  whos=who's  whove=who've  whyll=why'll
    whyre=why're  whys=why's  wont=won't  wouldve=would've  wouldnt=wouldn't  wouldnt've=wouldn't've
    wouldn'tve=wouldn't've  yall=y'all  yall'll=y'all'll  y'allll=y'all'll  yall'd've=y'all'd've
    y'alld've=y'all'd've  y'all'dve=y'all'd've  youd=you'd  youd've=you'd've  you'dve=you'd've  youll=you'll
    youre=you're  youve=you've
"""
_CONTRACTIONS: dict[str, str] = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())


def process_punctuation(text: str) -> str:
    """The punctuation step of the VQA evaluation (``processPunctuation``).

    For each character of the evaluation's punctuation list (``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``): if it
    stands next to a space anywhere in the *input* text, or if the input has a digit-comma-digit group such as
    ``1,000``, every occurrence is deleted; otherwise every occurrence becomes a space. Then periods not followed
    by a digit are deleted (at most 32, as the evaluation does). Apostrophes and colons are kept (``"10:30"`` stays
    ``"10:30"``), and the text is not lower-cased here.

    Args:
        text: an answer.

    Returns:
        the processed text (spaces are not collapsed; :func:`process_digit_article` splits on whitespace).
    """
    out = text
    delete_all = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if delete_all or (p + " " in text) or (" " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The digit/article/contraction step of the VQA evaluation (``processDigitArticle``).

    Lower-cases and splits on whitespace; maps the number words ``none``, ``zero`` .. ``ten`` to digits; drops the
    articles ``a``, ``an``, ``the``; replaces apostrophe-less contractions by their spelling (``dont`` ->
    ``don't``); joins with single spaces.

    Args:
        text: an answer, usually after :func:`process_punctuation`.

    Returns:
        the processed answer.
    """
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process(text: str) -> str:
    return process_digit_article(process_punctuation(text))


_VQA_RULES = ("current", "2017")


def vqa_scores(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], *, rules: str = "2017"
) -> list[float]:
    """Per-question VQA accuracy of the official evaluation (GT-Vision-Lab ``vqaEval.py``), each in 0..1.

    Each human answer is left out in turn and the prediction scores ``min(1, matches among the others / 3)``; the
    question scores the mean over the left-out answers. Matching is exact string equality after the processing
    below, which depends on whether the human answers of the question are all identical:

    * ``rules="current"`` (the evaluation as it stands since its 2021 "Fixed processing answers bug" commit,
      a013f00): newlines/tabs become spaces and the prediction and every human answer are stripped; then, only
      if the human answers are not all identical, the prediction *and* the human answers go through
      :func:`process_punctuation` and :func:`process_digit_article`. When they are all identical nothing is
      processed, so ``"two"`` against ten ``"2"`` (or ``"yes."`` against ten ``"yes"``) scores 0.
    * ``rules="2017"`` (the default; the v2.0 release, c4e6a0e, as the fine-tuning issue specifies it): the prediction is always stripped and fully processed; the
      human answers are not stripped and, only if they are not all identical, go through
      :func:`process_punctuation` alone (no digit/article step, no lower-casing). So ``"two"`` matches ten
      ``"2"``, but a human ``"two"`` among differing answers never matches anything the processing can produce.

    Args:
        predictions: one predicted answer per question.
        answers: the human answers of each question (usually 10).
        rules: which version of the official processing to apply (see above).

    Returns:
        the score of each question, in order.

    Raises:
        ValueError: if the two sequences have different lengths, a question has no answers, or ``rules`` is
            unknown.
        TypeError: if a question's answers are given as one string instead of a sequence of strings.
    """
    if rules not in _VQA_RULES:
        raise ValueError(f"rules must be one of {_VQA_RULES}, got {rules!r}")
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions but {len(answers)} answer lists")
    scores = []
    for index, (prediction, human) in enumerate(zip(predictions, answers)):
        if isinstance(human, str):
            raise TypeError(f"answers[{index}] is a string; expected a sequence of answer strings")
        human = list(human)
        if not human:
            raise ValueError(f"question {index} has no answers")
        predicted = _strip(prediction)
        if rules == "current":
            human = [_strip(a) for a in human]
            if len(set(human)) > 1:
                human = [_process(a) for a in human]
                predicted = _process(predicted)
        else:
            predicted = _process(predicted)
            if len(set(human)) > 1:
                human = [process_punctuation(a) for a in human]
        matches = sum(a == predicted for a in human)
        # Leaving out answer m leaves `matches - [human[m] == predicted]` matching answers among the others.
        total = sum(min(1.0, (matches - (a == predicted)) / 3) for a in human)
        scores.append(total / len(human))
    return scores


def vqa_accuracy(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], *, rules: str = "2017"
) -> float:
    """VQA accuracy of the official evaluation, in percent: the mean of :func:`vqa_scores` times 100.

    Args:
        predictions: one predicted answer per question.
        answers: the human answers of each question.
        rules: which version of the official processing to apply (see :func:`vqa_scores`).

    Returns:
        the accuracy in percent (not rounded; the official tool rounds to 2 decimals).

    Raises:
        ValueError: as :func:`vqa_scores`, and if there are no questions.
    """
    scores = vqa_scores(predictions, answers, rules=rules)
    if not scores:
        raise ValueError("no questions to evaluate")
    return 100.0 * sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------------------------
# Ranking metrics
# ---------------------------------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 24  # score-matrix elements compared at once (bounds the temporary boolean masks)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks is empty")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every k must be a positive int, got {k!r}")
    return ks


def _check_scores(scores: Tensor, name: str) -> None:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {scores.dtype}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN")


def _check_index(index: Tensor | Sequence[int], length: int, upper: int, name: str, device: torch.device) -> Tensor:
    index = torch.as_tensor(index)
    if index.ndim != 1 or index.numel() != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(index.shape)}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {index.dtype}")
    index = index.to(device=device, dtype=torch.long)
    bad = ((index < 0) | (index >= upper)).nonzero().flatten()
    if bad.numel():
        first = ", ".join(f"[{i}]={index[i].item()}" for i in bad[:5].tolist())
        raise ValueError(f"{name} has {bad.numel()} value(s) outside [0, {upper}): {first}")
    return index


def _percent(hits: Tensor) -> float:
    return hits.sum().item() * 100.0 / hits.numel()


def retrieval_recall(scores: Tensor, text_to_image: Tensor, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """Image-text retrieval recall at k, in percent (spec §8).

    * ``tr_r{k}`` (text retrieval, image to text): for each image, a hit if at least one of its texts is among its
      top-k texts.
    * ``ir_r{k}`` (image retrieval, text to image): for each text, a hit if its image is among its top-k images.
    * ``r_mean``: the mean of all the recalls returned (the six numbers for the default ``ks``), the official
      selection metric.

    Ties are broken against the correct candidates (see the module docstring): an image's rank is the number of
    texts *of other images* scoring at least as high as its best text, a text's rank the number of other images
    scoring at least as high as its own image, and a hit at k means rank < k. A k larger than the number of
    candidates (texts for ``tr``, images for ``ir``) is clipped to it, which makes it a sure hit.

    Args:
        scores: ``(num_images, num_texts)`` similarities, one row per (deduplicated) image.
        text_to_image: ``(num_texts,)`` integers: the row of the image each text describes.
        ks: the cut-offs.

    Returns:
        ``{"tr_r1": .., "tr_r5": .., "tr_r10": .., "ir_r1": .., "ir_r5": .., "ir_r10": .., "r_mean": ..}`` (the keys
        follow ``ks``).

    Raises:
        ValueError: on a wrong shape, NaN scores, an image index out of range, an image that no text describes
            (an image without texts has no defined recall; drop it before scoring), or a non-positive k.
        TypeError: if ``scores`` is not a floating-point tensor or ``text_to_image`` not integer.
    """
    _check_scores(scores, "scores")
    ks = _check_ks(ks)
    num_images, num_texts = scores.shape
    t2i = _check_index(text_to_image, num_texts, num_images, "text_to_image", scores.device)
    orphans = (torch.bincount(t2i, minlength=num_images) == 0).nonzero().flatten()
    if orphans.numel():
        first = ", ".join(str(i) for i in orphans[:10].tolist())
        more = "" if orphans.numel() <= 10 else ", ..."
        raise ValueError(f"{orphans.numel()} image(s) have no text: rows {first}{more}")

    text_ids = torch.arange(num_texts, device=scores.device)
    correct = scores[t2i, text_ids]  # (num_texts,) the score of each text with its own image
    ir_rank = torch.zeros(num_texts, dtype=torch.long, device=scores.device)
    tr_rank = torch.empty(num_images, dtype=torch.long, device=scores.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // num_texts)
    for start in range(0, num_images, rows_per_chunk):
        block = scores[start:start + rows_per_chunk]
        rows = torch.arange(start, start + block.shape[0], device=scores.device)
        own = t2i[None, :] == rows[:, None]  # (rows, texts): text describes this image
        # Text to image: images of this block scoring at least the text's own image (the own image included).
        ir_rank += (block >= correct[None, :]).sum(0)
        # Image to text: texts of other images scoring at least the image's best text.
        best = block.masked_fill(~own, float("-inf")).amax(1)
        tr_rank[start:start + block.shape[0]] = ((block >= best[:, None]) & ~own).sum(1)
    ir_rank -= 1  # the own image was counted

    result: dict[str, float] = {}
    for k in ks:
        result[f"tr_r{k}"] = _percent(tr_rank < min(k, num_texts))
    for k in ks:
        result[f"ir_r{k}"] = _percent(ir_rank < min(k, num_images))
    result["r_mean"] = sum(result.values()) / len(result)
    return result


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """Top-k classification accuracy in percent (ImageNet), as ``acc{k}`` for each k.

    A sample is a hit at k when fewer than k *other* classes score at least as high as its label (ties count
    against the label; see the module docstring). k is clipped to the number of classes.

    Args:
        logits: ``(num_samples, num_classes)`` scores.
        labels: ``(num_samples,)`` class indices.
        ks: the cut-offs.

    Returns:
        ``{"acc1": .., "acc5": ..}`` (the keys follow ``ks``).

    Raises:
        ValueError: on a wrong shape, NaN logits, a label out of range, or a non-positive k.
        TypeError: if ``logits`` is not a floating-point tensor or ``labels`` not integer.
    """
    _check_scores(logits, "logits")
    ks = _check_ks(ks)
    num_samples, num_classes = logits.shape
    labels = _check_index(labels, num_samples, num_classes, "labels", logits.device)
    own = logits.gather(1, labels[:, None])  # (num_samples, 1)
    rank = (logits >= own).sum(1) - 1  # other classes scoring at least the label's score
    return {f"acc{k}": _percent(rank < min(k, num_classes)) for k in ks}


def accuracy(predictions: Tensor | Sequence[int], labels: Tensor | Sequence[int]) -> float:
    """Classification accuracy in percent (NLVR2).

    Args:
        predictions: ``(num_samples,)`` predicted class indices, or ``(num_samples, num_classes)`` logits, of which
            the argmax is taken as the official code does (on exact ties, the first maximal class).
        labels: ``(num_samples,)`` class indices.

    Returns:
        the percentage of predictions equal to their label.

    Raises:
        ValueError: if the shapes do not match or there are no samples.
    """
    predictions = torch.as_tensor(predictions)
    labels = torch.as_tensor(labels)
    if predictions.ndim == 2:
        if predictions.shape[1] == 0:
            raise ValueError(f"logits have no classes: shape {tuple(predictions.shape)}")
        predictions = predictions.argmax(dim=1)
    if predictions.ndim != 1 or labels.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must both have shape (N,)"
        )
    if labels.numel() == 0:
        raise ValueError("no samples to evaluate")
    return _percent(predictions.to(labels.device) == labels)
