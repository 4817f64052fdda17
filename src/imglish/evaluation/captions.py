"""Captioning metrics: BLEU-1..4, METEOR, ROUGE_L, CIDEr(-D) and SPICE, in percent, as coco-caption reports them.

Two backends compute them (:func:`caption_backend` says which one is used):

* ``"coco"``: pycocoevalcap itself (the official evaluation, spec §8): its Java PTB tokenizer, then its Bleu(4),
  Meteor, Rouge, Cider and, when its Stanford CoreNLP models are on disk, Spice. Needs ``java`` on the PATH and the
  optional ``eval`` extra. Nothing is ever downloaded: SPICE is skipped when its models are missing.
* ``"python"``: a pure-Python re-implementation of the tokenizer, BLEU, ROUGE_L and CIDEr-D (no METEOR, no SPICE)
  for machines without Java. On captions of plain words it gives the coco numbers to within rounding (the tests
  measure the difference); :func:`tokenize_caption` lists where its tokenizer departs from the Java one.

The formulas of the Python backend, as coco-caption computes them:

* BLEU (corpus level): n-gram counts of the candidate are clipped by their largest count in any one reference and
  summed over all images; ``Bleu_n`` is the geometric mean of the clipped precisions of orders 1..n, each
  ``(correct + 1e-15) / (guessed + 1e-9)``; the brevity penalty ``exp(1 - r / c)`` applies when the total candidate
  length c is below the total effective reference length r, each image contributing the reference length closest
  to its candidate's (the shorter one on a tie).
* ROUGE_L: per image, the LCS of the candidate with each reference gives a precision ``lcs / len(candidate)`` and a
  recall ``lcs / len(reference)``; their maxima over the references (taken separately) give
  ``F = (1 + b^2) P R / (R + b^2 P)`` with b = 1.2 (0 if P or R is 0); the score is the mean over images.
* CIDEr-D: n-grams of orders 1..4 weighted by tf-idf, where the document frequency of an n-gram is the number of
  evaluated images whose references contain it and the idf is ``log(number of images) - log(max(1, df))``; per
  order, the candidate's vector is compared with each reference's as ``sum(min(c, r) * r) / (|c| |r|)`` (0 when
  either norm is 0), times the length penalty ``exp(-d^2 / (2 * 6^2))``, where d is the difference of their
  numbers of bigrams; the orders are averaged, the references averaged, times 10, then averaged over images. With
  a single image every idf is 0, so CIDEr is 0.

Every value is returned times 100 (coco-caption's 1.336 CIDEr is reported as 133.6).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any

__all__ = ["METRICS", "caption_backend", "caption_scores", "tokenize_caption"]

# The metrics, in the order they are returned.
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
_PYTHON_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")
_BLEU = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
_BACKENDS = ("auto", "coco", "python")

# ---------------------------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------------------------


def _pycocoevalcap_dir() -> str | None:
    try:
        import pycocoevalcap  # namespace package: no code runs
    except ImportError:
        return None
    paths = list(getattr(pycocoevalcap, "__path__", []))
    return paths[0] if paths else None


def _coco_problem() -> str | None:
    """Why the coco backend cannot run here, or None when it can."""
    if shutil.which("java") is None:
        return "`java` is not on the PATH"
    root = _pycocoevalcap_dir()
    if root is None:
        return "pycocoevalcap is not installed (pip install 'imglish[eval]')"
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    except ImportError as error:
        return f"pycocoevalcap does not import: {error}"
    jar = os.path.join(os.path.dirname(ptb.__file__), ptb.STANFORD_CORENLP_3_4_1_JAR)
    if not os.path.isfile(jar):
        return f"the PTB tokenizer jar is missing: {jar}"
    return None


def _spice_available() -> bool:
    """True when pycocoevalcap's SPICE jar and the Stanford CoreNLP 3.6.0 jars it needs are on disk."""
    root = _pycocoevalcap_dir()
    if root is None:
        return False
    spice = os.path.join(root, "spice")
    needed = ("spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar", "lib/stanford-corenlp-3.6.0-models.jar")
    return all(os.path.isfile(os.path.join(spice, name)) for name in needed)


def caption_backend(backend: str = "auto") -> str:
    """The backend :func:`caption_scores` uses for this ``backend`` argument.

    Args:
        backend: ``"auto"`` (``"coco"`` when ``java`` is on the PATH and pycocoevalcap imports, else
            ``"python"``), ``"coco"`` or ``"python"``.

    Returns:
        ``"coco"`` or ``"python"``.

    Raises:
        ValueError: on an unknown backend name.
        RuntimeError: if ``"coco"`` is asked for and cannot run here (the message says why).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "python":
        return "python"
    problem = _coco_problem()
    if problem is None:
        return "coco"
    if backend == "coco":
        raise RuntimeError(f"the coco caption backend cannot run: {problem}")
    return "python"


# ---------------------------------------------------------------------------------------------------------------
# Python tokenizer (an approximation of Stanford's PTBTokenizer -preserveLines -lowerCase + coco's filter)
# ---------------------------------------------------------------------------------------------------------------

# Tokens that coco-caption's tokenizer wrapper drops after PTB tokenization.
_DROPPED = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                      "...", ";"})

# With -lowerCase the bracket tokens come out as "-lrb-" etc., which the (upper-case) drop list above misses: coco
# keeps them as words, and so does this tokenizer.
_CHAR_MAP = {
    "(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- ",
    '"': " `` ", "\u201c": " `` ", "\u201d": " '' ", "\u2018": " ` ", "\u2019": "'",
    "\u00a3": "#", "\u20ac": "$", "\u00a2": " cents ",
}
_CHAR_TABLE = str.maketrans(_CHAR_MAP)

# Abbreviations that PTBTokenizer keeps together with their period (checked against CoreNLP 3.4.1).
_ABBREVIATIONS = ("mrs", "mr", "ms", "dr", "st", "jr", "sr", "vs", "etc", "mt", "prof", "inc", "ltd", "co", "ave",
                  "dept", "gen", "gov", "sgt", "capt")

_TOKEN = re.compile(
    r"""
      -l[rsc]b- | -r[rsc]b- | `` | ''                      # tokens made by _CHAR_MAP
    | (?:""" + "|".join(_ABBREVIATIONS) + r""")\.           # known abbreviations with their period
    | [^\W\d_](?:\.[^\W\d_])+\.?(?![^\W_])                  # dotted letters: u.s. a.m. e.g. u.s.a
    | \d+(?:[.,:]\d+)+ | \.\d+                              # numbers with separators: 1,000 3.5 10:30 .5
    | [^\W_]+(?:[-/][^\W_]+|'[^\W\d_]+)*                    # words, with inner hyphens, slashes, apostrophes
    | \.{2,} | -{2,} | [!?]{2,}                             # ellipses, dashes, runs of ! and ?
    | \S                                                    # any other character
    """,
    re.VERBOSE,
)

_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"), "gotta": ("got", "ta"),
                "lemme": ("lem", "me"), "gimme": ("gim", "me")}


def _split_word(token: str) -> tuple[str, ...]:
    if token in _SPLIT_WORDS:
        return _SPLIT_WORDS[token]
    if token.endswith("n't") and len(token) > 3:
        return token[:-3], "n't"
    for clitic in _CLITICS:
        if token.endswith(clitic) and len(token) > len(clitic):
            return token[: -len(clitic)], clitic
    return (token,)


def tokenize_caption(text: str) -> str:
    """Tokenize a caption the way coco-caption's PTBTokenizer wrapper does, in pure Python.

    Lower-cases; splits off punctuation, the clitics ``n't 's 're 've 'll 'd 'm`` (``"isn't"`` -> ``"is n't"``,
    ``"can't"`` -> ``"ca n't"``) and ``cannot``/``gonna``-style words; keeps hyphenated and slashed words,
    numbers with separators (``1,000``, ``3.5``, ``10:30``), dotted abbreviations (``u.s.``) and a few common ones
    (``mr.``, ``st.``); turns brackets into ``-lrb-``-style words (which coco keeps) and quotes into quote tokens;
    then drops the tokens coco-caption drops (``'' ' `` ` . ? ! , : - -- ... ;``) and joins with single spaces.

    Known differences from CoreNLP 3.4.1's lexer: its abbreviation list is longer and context-dependent (``no.``
    keeps its period only before a number); it splits ``'tis``, ``y'all`` and ``rock'n'roll`` differently, keeps
    ``'90s`` and upper-case ``AT&T`` whole and treats other rare symbols and Unicode punctuation by its own rules.
    Captions made of words, numbers and ordinary punctuation tokenize identically.

    Args:
        text: a caption.

    Returns:
        the tokens, joined by single spaces.
    """
    text = text.replace("\n", " ").lower().translate(_CHAR_TABLE)
    tokens = []
    for token in _TOKEN.findall(text):
        if len(token) > 1 and set(token) == {"."}:
            token = "..."
        elif len(token) > 2 and set(token) == {"-"}:
            token = "--"
        for part in _split_word(token):
            if part not in _DROPPED:
                tokens.append(part)
    return " ".join(tokens)


# ---------------------------------------------------------------------------------------------------------------
# Python scorers (on tokenized strings)
# ---------------------------------------------------------------------------------------------------------------

_TINY = 1e-15  # added to the matched n-gram counts (so that no match gives ~0, not 0/0)
_SMALL = 1e-9  # added to the guessed n-gram counts and to the reference length


def _ngrams(words: Sequence[str], max_n: int) -> Counter:
    counts: Counter = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i:i + n])] += 1
    return counts


def _bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    guessed = [0] * max_n
    correct = [0] * max_n
    candidate_length = reference_length = 0
    for candidate, refs in zip(candidates, references):
        words = candidate.split()
        clip: dict[tuple[str, ...], int] = {}
        ref_lengths = []
        for ref in refs:
            ref_words = ref.split()
            ref_lengths.append(len(ref_words))
            for gram, count in _ngrams(ref_words, max_n).items():
                clip[gram] = max(clip.get(gram, 0), count)
        length = len(words)
        candidate_length += length
        reference_length += min(ref_lengths, key=lambda r: (abs(r - length), r))
        for n in range(1, max_n + 1):
            guessed[n - 1] += max(0, length - n + 1)
        for gram, count in _ngrams(words, max_n).items():
            correct[len(gram) - 1] += min(count, clip.get(gram, 0))
    scores = []
    product = 1.0
    for n in range(max_n):
        product *= (correct[n] + _TINY) / (guessed[n] + _SMALL)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (candidate_length + _TINY) / (reference_length + _SMALL)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        scores = [s * penalty for s in scores]
    return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def _rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    total = 0.0
    for candidate, refs in zip(candidates, references):
        words = candidate.split(" ")  # coco splits on single spaces: an empty caption is one empty token
        best_precision = best_recall = 0.0
        for ref in refs:
            ref_words = ref.split(" ")
            lcs = _lcs_length(ref_words, words)
            best_precision = max(best_precision, lcs / len(words))
            best_recall = max(best_recall, lcs / len(ref_words))
        if best_precision > 0 and best_recall > 0:
            total += ((1 + beta**2) * best_precision * best_recall) / (best_recall + beta**2 * best_precision)
    return total / len(candidates)


def _cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
             sigma: float = 6.0) -> float:
    candidate_counts = [_ngrams(c.split(), max_n) for c in candidates]
    reference_counts = [[_ngrams(r.split(), max_n) for r in refs] for refs in references]
    document_frequency: Counter = Counter()
    for refs in reference_counts:
        document_frequency.update({gram for counts in refs for gram in counts})
    log_images = math.log(len(candidates))

    def weigh(counts: Counter) -> tuple[list[dict], list[float], int]:
        vectors: list[dict] = [{} for _ in range(max_n)]
        squares = [0.0] * max_n
        for gram, tf in counts.items():
            n = len(gram) - 1
            weight = tf * (log_images - math.log(max(1.0, document_frequency[gram])))
            vectors[n][gram] = weight
            squares[n] += weight * weight
        bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)  # coco's "length"
        return vectors, [math.sqrt(s) for s in squares], bigrams

    total = 0.0
    for counts, refs in zip(candidate_counts, reference_counts):
        vec, norm, length = weigh(counts)
        per_order = [0.0] * max_n
        for ref in refs:
            ref_vec, ref_norm, ref_length = weigh(ref)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                value = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in vec[n].items())
                if norm[n] != 0 and ref_norm[n] != 0:
                    value /= norm[n] * ref_norm[n]
                per_order[n] += value * penalty
        total += sum(per_order) / max_n / len(refs) * 10.0
    return total / len(candidates)


# ---------------------------------------------------------------------------------------------------------------
# Coco backend
# ---------------------------------------------------------------------------------------------------------------


def _coco_scores(ids: Sequence[Hashable], predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]],
                 wanted: Collection[str]) -> dict[str, float]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    def one_line(caption: str) -> dict[str, str]:
        # The tokenizer pairs its output lines with the captions: a carriage return would shift them.
        return {"caption": caption.replace("\r", " ")}

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [one_line(c) for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [one_line(predictions[i])] for i in ids})
    out: dict[str, float] = {}

    def quiet() -> contextlib.AbstractContextManager:
        return contextlib.redirect_stdout(io.StringIO())  # the scorers print progress

    if any(m in wanted for m in _BLEU):
        from pycocoevalcap.bleu.bleu import Bleu

        with quiet():
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update(zip(_BLEU, map(float, bleu)))
    if "METEOR" in wanted:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            out["METEOR"] = float(meteor.compute_score(gts, res)[0])
        finally:
            del meteor  # its __del__ ends the Java process
    if "ROUGE_L" in wanted:
        from pycocoevalcap.rouge.rouge import Rouge

        out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in wanted:
        from pycocoevalcap.cider.cider import Cider

        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if "SPICE" in wanted:
        from pycocoevalcap.spice.spice import Spice

        with quiet():
            out["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------------------


def _some(ids: Collection[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:limit])
    return shown + (", ..." if len(ids) > limit else "")


def _check_inputs(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> list[Any]:
    if not references:
        raise ValueError("no references to evaluate against")
    missing = [i for i in references if i not in predictions]
    unknown = [i for i in predictions if i not in references]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} reference id(s) have no prediction ({_some(missing)})")
        if unknown:
            parts.append(f"{len(unknown)} prediction id(s) have no references ({_some(unknown)})")
        raise ValueError("predictions must cover exactly the reference ids: " + "; ".join(parts))
    for i, refs in references.items():
        if isinstance(refs, str):
            raise TypeError(f"references[{i!r}] is a string; expected a sequence of reference captions")
        if len(refs) == 0:
            raise ValueError(f"references[{i!r}] is empty")
        for ref in refs:
            if not isinstance(ref, str):
                raise TypeError(f"references[{i!r}] holds a {type(ref).__name__}, expected str")
        if not isinstance(predictions[i], str):
            raise TypeError(f"predictions[{i!r}] is a {type(predictions[i]).__name__}, expected str")
    return list(references)


def caption_scores(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    backend: str = "auto",
    *,
    metrics: Collection[str] | None = None,
) -> dict[str, float]:
    """Caption metrics of one caption per image against its reference captions, in percent.

    Args:
        predictions: ``{image_id: caption}``; must hold exactly the ids of ``references``.
        references: ``{image_id: [reference caption, ...]}``, at least one per image.
        backend: ``"auto"``, ``"coco"`` or ``"python"`` (see :func:`caption_backend`).
        metrics: the names to compute, among :data:`METRICS`; by default every metric the backend offers:
            ``Bleu_1``..``Bleu_4``, ``METEOR`` (coco only), ``ROUGE_L``, ``CIDEr`` and ``SPICE`` (coco only, and
            only when its CoreNLP models are on disk). METEOR and SPICE start Java programs that take seconds to
            load, so asking for, say, ``("CIDEr",)`` is much faster during training.

    Returns:
        ``{metric: value}`` in the order of :data:`METRICS`, every value times 100.

    Raises:
        ValueError: if a reference id has no prediction or a prediction id no references (a few are named),
            an image has no references, there are no images, the backend is unknown, or a metric is unknown or
            not offered by the backend (METEOR/SPICE on the python backend, SPICE without its models).
        TypeError: if a caption is not a string, or an image's references are one string.
        RuntimeError: if ``backend="coco"`` cannot run here.
    """
    ids = _check_inputs(predictions, references)
    chosen = caption_backend(backend)
    if chosen == "python":
        offered = _PYTHON_METRICS
    else:
        offered = tuple(m for m in METRICS if m != "SPICE" or _spice_available())
    if metrics is None:
        wanted = set(offered)
    else:
        if isinstance(metrics, str):
            metrics = (metrics,)
        wanted = set(metrics)
        unknown = wanted - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose among {METRICS}")
        unavailable = wanted - set(offered)
        if unavailable:
            why = "the python backend" if chosen == "python" else "this machine (SPICE needs its CoreNLP models)"
            raise ValueError(f"{sorted(unavailable)} cannot be computed by {why}")
    if chosen == "coco":
        raw = _coco_scores(ids, predictions, references, wanted)
    else:
        candidates = [tokenize_caption(predictions[i]) for i in ids]
        refs = [[tokenize_caption(r) for r in references[i]] for i in ids]
        raw = {}
        if any(m in wanted for m in _BLEU):
            raw.update(zip(_BLEU, _bleu(candidates, refs)))
        if "ROUGE_L" in wanted:
            raw["ROUGE_L"] = _rouge_l(candidates, refs)
        if "CIDEr" in wanted:
            raw["CIDEr"] = _cider_d(candidates, refs)
    return {m: 100.0 * raw[m] for m in METRICS if m in wanted}
