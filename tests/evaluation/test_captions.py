"""Caption metrics: hand-computed BLEU / ROUGE_L / CIDEr-D on the python backend, and its agreement with coco."""

from __future__ import annotations

import math
import random

import pytest

from imglish.evaluation import captions
from imglish.evaluation.captions import caption_backend, caption_scores, tokenize_caption

TINY, SMALL = 1e-15, 1e-9  # coco-caption's BLEU epsilons
LOG2 = math.log(2)


def py(predictions, references, **kwargs):
    return caption_scores(predictions, references, backend="python", **kwargs)


def coco_available() -> bool:
    try:
        return caption_backend("coco") == "coco"
    except RuntimeError:
        return False


needs_coco = pytest.mark.skipif(
    not coco_available(), reason="the coco backend needs `java` on the PATH and pycocoevalcap (pip install '.[eval]')"
)

# ----------------------------------------------------------------------------------------------------------------
# BLEU
# ----------------------------------------------------------------------------------------------------------------


def test_identical_captions_score_100_and_cider_1000():
    # Two images with disjoint words: every n-gram has df 1, idf log 2, every order matches fully.
    refs = {1: ["a man rides a brown horse"], 2: ["two dogs play in the snow"]}
    preds = {1: "a man rides a brown horse", 2: "two dogs play in the snow"}
    s = py(preds, refs)
    assert list(s) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L"):
        assert s[key] == pytest.approx(100.0, abs=1e-6)
    assert s["CIDEr"] == pytest.approx(1000.0, abs=1e-9)  # 10 per image, times 100


def test_bleu_pools_counts_over_images_with_brevity_penalty():
    # Image A: "a b" vs "a b c d" (1-grams 2/2, 2-grams 1/1); image B: "x y z" vs itself (3/3, 2/2, 1/1).
    # Pooled precisions: p1 = 5/5, p2 = 3/3, p3 = 1/1, p4 = 0/0 -> (0 + tiny) / (0 + small) = 1e-6.
    # Lengths: candidates 2 + 3 = 5, references 4 + 3 = 7 -> penalty exp(1 - 7/5).
    s = py({"A": "a b", "B": "x y z"}, {"A": ["a b c d"], "B": ["x y z"]})
    bp = math.exp(1 - 7 / 5)
    p = [(5 + TINY) / (5 + SMALL), (3 + TINY) / (3 + SMALL), (1 + TINY) / (1 + SMALL), TINY / SMALL]
    for n in range(1, 5):
        assert s[f"Bleu_{n}"] == pytest.approx(100 * bp * math.prod(p[:n]) ** (1 / n), rel=1e-9)
    assert s["Bleu_4"] == pytest.approx(100 * math.exp(-0.4) * 1e-6**0.25, rel=1e-6)  # = 2.12


def test_bleu_clips_counts_and_uses_the_closest_reference_length():
    # "a b a" against "a b c d e" / "a b c": "a" occurs at most once in a reference -> 1-grams 2/3; 2-grams
    # "a b" (yes), "b a" (no) -> 1/2. The closest reference length is 3 (not the average 4): no penalty.
    s = py({0: "a b a"}, {0: ["a b c d e", "a b c"]})
    assert s["Bleu_1"] == pytest.approx(100 * 2 / 3, rel=1e-6)
    assert s["Bleu_2"] == pytest.approx(100 * math.sqrt(2 / 3 * 1 / 2), rel=1e-6)
    assert s["Bleu_3"] == pytest.approx(100 * (2 / 3 * 1 / 2 * TINY / (1 + SMALL)) ** (1 / 3), rel=1e-6)


def test_bleu_closest_length_tie_takes_the_shorter_reference():
    # Candidate length 4, references 3 and 5 are equally close: 3 is used, so no brevity penalty.
    s = py({0: "a b c d"}, {0: ["a b c", "a b c d e"]})
    assert s["Bleu_1"] == pytest.approx(100.0, abs=1e-6)
    # With only the longer reference the penalty exp(1 - 5/4) applies.
    s = py({0: "a b c d"}, {0: ["a b c d e"]})
    assert s["Bleu_1"] == pytest.approx(100 * math.exp(1 - 5 / 4), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# ROUGE_L
# ----------------------------------------------------------------------------------------------------------------


def f_measure(p: float, r: float, beta: float = 1.2) -> float:
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def test_rouge_l_single_reference():
    # LCS("a b c d", "a c e") = 2 ("a c"): precision 2/4, recall 2/3.
    s = py({0: "a b c d"}, {0: ["a c e"]})
    assert s["ROUGE_L"] == pytest.approx(100 * f_measure(1 / 2, 2 / 3))
    assert s["ROUGE_L"] == pytest.approx(58.6538, abs=1e-4)


def test_rouge_l_maximises_precision_and_recall_separately():
    # "a b" gives P 2/4, R 1; the long reference gives P 1, R 4/8: the maxima (1, 1) give F = 1, although no
    # single reference does.
    s = py({0: "a b c d"}, {0: ["a b", "a b c d e f g h"]})
    assert s["ROUGE_L"] == pytest.approx(100.0)


def test_rouge_l_is_averaged_over_images():
    s = py({0: "a b c d", 1: "x y"}, {0: ["a b c d"], 1: ["p q"]})
    assert s["ROUGE_L"] == pytest.approx(50.0)


# ----------------------------------------------------------------------------------------------------------------
# CIDEr-D
# ----------------------------------------------------------------------------------------------------------------


def test_cider_two_word_captions_have_no_3_and_4_grams():
    # Identical 2-word captions, disjoint across the 2 images: orders 1 and 2 give 1, orders 3 and 4 give 0
    # (empty vectors), so each image scores 10 * (1 + 1 + 0 + 0) / 4 = 5.
    s = py({0: "a b", 1: "c d"}, {0: ["a b"], 1: ["c d"]})
    assert s["CIDEr"] == pytest.approx(500.0)


def test_cider_document_frequency():
    # "a" is in the references of both images: df 2, idf log 2 - log 2 = 0, so it weighs nothing. Every other
    # n-gram has idf log 2 (df 1, or df 0 for n-grams of no reference, counted as 1).
    # Image A: "a b e f" vs "a b c d": order 1 matches b of {b, e, f} against {b, c, d}: L^2 / (sqrt3 L)^2 = 1/3;
    #   order 2 matches "a b" of 3 bigrams each: 1/3; orders 3, 4 nothing. Same number of bigrams: no penalty.
    #   10 * (1/3 + 1/3) / 4 = 5/3.
    # Image B: identical -> 10.
    s = py({"A": "a b e f", "B": "a x y z"}, {"A": ["a b c d"], "B": ["a x y z"]})
    assert s["CIDEr"] == pytest.approx(100 * (5 / 3 + 10) / 2)


def test_cider_gaussian_length_penalty():
    # Image A: "a b" vs "a b c d": order 1: 2 L^2 / (sqrt2 L * 2 L) = 1/sqrt2; order 2: L^2 / (L * sqrt3 L) =
    # 1/sqrt3; orders 3, 4: empty candidate vectors -> 0. Bigram counts 1 vs 3: penalty exp(-(1-3)^2 / 72).
    # Image B: identical 4-word caption -> 10.
    s = py({"A": "a b", "B": "e f g h"}, {"A": ["a b c d"], "B": ["e f g h"]})
    image_a = 10 * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4 * math.exp(-4 / 72)
    assert s["CIDEr"] == pytest.approx(100 * (image_a + 10) / 2)


def test_cider_averages_over_references():
    # Image A has 2 references: its identical one gives 10, the disjoint one 0 -> 5. Image B: 10.
    s = py({"A": "a b c d", "B": "e f g h"}, {"A": ["a b c d", "p q r s"], "B": ["e f g h"]})
    assert s["CIDEr"] == pytest.approx(100 * (5 + 10) / 2)


def test_nothing_shared_scores_zero():
    s = py({0: "x y z", 1: "u v w"}, {0: ["a b c"], 1: ["d e f"]})
    assert s["CIDEr"] == 0.0
    assert s["ROUGE_L"] == 0.0
    assert s["Bleu_1"] == pytest.approx(0.0, abs=1e-9)


def test_cider_of_a_single_image_is_zero():
    # log(1 image) = 0 and every df <= 1: all idf weights vanish.
    assert py({0: "a b c d"}, {0: ["a b c d"]})["CIDEr"] == 0.0


def test_empty_prediction():
    s = py({0: "", 1: "c d e f"}, {0: ["a b"], 1: ["c d e f"]})
    assert s["ROUGE_L"] == pytest.approx(50.0)
    assert s["Bleu_1"] > 0


def test_tokenization_is_applied():
    # Case and punctuation do not matter: these are the identical-caption case above.
    refs = {1: ["A man rides a brown horse."], 2: ["Two dogs, play in the snow!"]}
    preds = {1: "a man rides a brown horse", 2: "two dogs play in the snow"}
    assert py(preds, refs)["CIDEr"] == pytest.approx(1000.0)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------

# Outputs of coco-caption's PTBTokenizer wrapper (CoreNLP 3.4.1, -lowerCase) for these inputs.
PTB_CASES = [
    ("A man (in a hat) rides a horse.", "a man -lrb- in a hat -rrb- rides a horse"),
    ('The dog\'s ball isn\'t red; it\'s "blue"!', "the dog 's ball is n't red it 's blue"),
    ("black-and-white photo of a 1,000 year-old tree at 10:30 a.m.",
     "black-and-white photo of a 1,000 year-old tree at 10:30 a.m."),
    ("Mr. Smith and Dr. Who went to the U.S. on 3.5 days... -- wow",
     "mr. smith and dr. who went to the u.s. on 3.5 days wow"),
    ("a cat & a dog / mouse $5 50% #1 a+b x=y ok? don't can't cannot won't I'm we're",
     "a cat & a dog / mouse $ 5 50 % # 1 a + b x = y ok do n't ca n't can not wo n't i 'm we 're"),
    ("and/or 1/2 cats' o'clock e-mail 2-3 hello- ok!? it\u2019s \u201cquoted\u201d ....",
     "and/or 1/2 cats o'clock e-mail 2-3 hello ok !? it 's quoted"),
    ("two  spaces\tand a tab", "two spaces and a tab"),
    ("", ""),
]


@pytest.mark.parametrize("text, expected", PTB_CASES)
def test_tokenize_caption(text, expected):
    assert tokenize_caption(text) == expected


@needs_coco
def test_tokenizer_agrees_with_java():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = [t for t, _ in PTB_CASES if t]
    java = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [java[i][0] for i in range(len(texts))] == [tokenize_caption(t) for t in texts]


# ----------------------------------------------------------------------------------------------------------------
# Python vs coco
# ----------------------------------------------------------------------------------------------------------------

NO_JAVA_PROGRAMS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")  # METEOR's Java start takes ~10 s


def synthetic_set(seed: int = 0, images: int = 20):
    rng = random.Random(seed)
    vocab = ["a", "man", "woman", "dog", "cat", "sits", "on", "the", "grass", "red", "ball", "playing", "with",
             "two", "people", "standing", "near", "street", "car", "bus", "white", "black", "table", "food",
             "plate", "of"]
    refs, preds = {}, {}
    for i in range(images):
        refs[i] = [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 12))) for _ in range(5)]
        base = rng.choice(refs[i]).split()
        preds[i] = " ".join(w if rng.random() < 0.7 else rng.choice(vocab) for w in base[: rng.randint(3, len(base))])
    return preds, refs


@needs_coco
def test_python_backend_matches_coco_on_plain_words():
    # Measured: identical BLEU and CIDEr, ROUGE_L within 1.5e-14 (summation order).
    preds, refs = synthetic_set()
    coco = caption_scores(preds, refs, backend="coco", metrics=NO_JAVA_PROGRAMS)
    python = py(preds, refs)
    assert list(coco) == list(python)
    for key in NO_JAVA_PROGRAMS:
        assert python[key] == pytest.approx(coco[key], abs=1e-9), key
    assert 20 < python["CIDEr"] < 300  # a non-degenerate set


@needs_coco
def test_python_backend_matches_coco_on_punctuated_captions():
    refs = {
        "a": ["A man riding a horse on a beach.", "A person rides a brown horse, near the ocean.",
              "Man on horseback at the sea shore"],
        "b": ["Two dogs playing with a frisbee in the park.", "The dogs are chasing a red frisbee!",
              "Dogs (two of them) play outside."],
        "c": ["A kitchen with a stove and a refrigerator.", "It's a small kitchen; there's a fridge.",
              "An empty kitchen"],
        "d": ["A plate of food with broccoli.", "Broccoli and rice on a white plate",
              "A dinner plate: chicken, rice, and broccoli."],
    }
    preds = {"a": "A man riding a horse on the beach.", "b": "Two dogs play with a frisbee.", "c": "",
             "d": "a plate of food"}
    coco = caption_scores(preds, refs, backend="coco", metrics=NO_JAVA_PROGRAMS)
    python = py(preds, refs)
    for key in NO_JAVA_PROGRAMS:
        assert python[key] == pytest.approx(coco[key], abs=1e-9), key


# ----------------------------------------------------------------------------------------------------------------
# Inputs and backends
# ----------------------------------------------------------------------------------------------------------------


def test_partial_predictions_are_refused():
    refs = {1: ["a"], 2: ["b"], 3: ["c"]}
    with pytest.raises(ValueError, match=r"2 reference id\(s\) have no prediction \(2, 3\)"):
        py({1: "a"}, refs)
    with pytest.raises(ValueError, match=r"prediction id\(s\) have no references \(9\)"):
        py({1: "a", 2: "b", 3: "c", 9: "z"}, refs)


def test_many_missing_ids_are_abbreviated():
    refs = {i: ["a"] for i in range(20)}
    with pytest.raises(ValueError, match=r"20 reference id\(s\) have no prediction \(0, 1, 2, 3, 4, \.\.\.\)"):
        py({}, refs)


def test_bad_references():
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        py({1: "a"}, {1: []})
    with pytest.raises(TypeError, match=r"references\['x'\] is a string"):
        py({"x": "a"}, {"x": "a cat"})
    with pytest.raises(TypeError, match=r"predictions\[1\]"):
        py({1: ["a"]}, {1: ["a"]})
    with pytest.raises(ValueError, match="no references"):
        py({}, {})


def test_metric_selection():
    refs = {0: ["a b c d"], 1: ["e f g h"]}
    preds = {0: "a b c d", 1: "e f g h"}
    assert py(preds, refs, metrics=("CIDEr",)) == {"CIDEr": pytest.approx(1000.0)}
    assert list(py(preds, refs, metrics=("CIDEr", "Bleu_2"))) == ["Bleu_2", "CIDEr"]
    with pytest.raises(ValueError, match="METEOR"):
        py(preds, refs, metrics=("METEOR",))
    with pytest.raises(ValueError, match="unknown metric"):
        py(preds, refs, metrics=("BLEU",))


def test_backend_selection(monkeypatch):
    assert caption_backend("python") == "python"
    assert caption_backend() in ("coco", "python")
    with pytest.raises(ValueError, match="backend"):
        caption_backend("java")
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    assert caption_backend("auto") == "python"
    with pytest.raises(RuntimeError, match="java"):
        caption_backend("coco")
    with pytest.raises(RuntimeError, match="java"):
        caption_scores({0: "a"}, {0: ["a"]}, backend="coco")
    # auto without Java: python metrics only
    assert "METEOR" not in caption_scores({0: "a", 1: "b"}, {0: ["a"], 1: ["b"]})


def test_spice_is_offered_only_with_its_models(monkeypatch):
    monkeypatch.setattr(captions, "_coco_problem", lambda: None)
    monkeypatch.setattr(captions, "_spice_available", lambda: False)
    with pytest.raises(ValueError, match="SPICE"):
        caption_scores({0: "a"}, {0: ["a"]}, backend="coco", metrics=("SPICE",))


def test_spice_needs_its_jar_and_corenlp_models(monkeypatch, tmp_path):
    monkeypatch.setattr(captions, "_pycocoevalcap_dir", lambda: str(tmp_path))
    (tmp_path / "spice" / "lib").mkdir(parents=True)
    (tmp_path / "spice" / "spice-1.0.jar").touch()
    assert not captions._spice_available()
    (tmp_path / "spice" / "lib" / "stanford-corenlp-3.6.0.jar").touch()
    assert not captions._spice_available()
    (tmp_path / "spice" / "lib" / "stanford-corenlp-3.6.0-models.jar").touch()
    assert captions._spice_available()
