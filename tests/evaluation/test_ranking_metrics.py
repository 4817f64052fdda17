"""Retrieval recall and classification accuracy, on hand-made score matrices."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from imglish.evaluation import metrics
from imglish.evaluation.metrics import accuracy, retrieval_recall, topk_accuracy

# 3 images, 2 texts each (text j describes image T2I[j]).
T2I = torch.tensor([0, 0, 1, 1, 2, 2])
SCORES = torch.tensor(
    [
        # image 0: best own text 0.9, no other text above -> rank 0
        [0.90, 0.10, 0.80, 0.20, 0.30, 0.40],
        # image 1: best own text 0.7 (text 3), other texts all below -> rank 0
        [0.50, 0.60, 0.10, 0.70, 0.20, 0.30],
        # image 2: its texts are ranked last: 4 texts of other images score above its best (0.2) -> rank 4
        [0.95, 0.90, 0.85, 0.80, 0.10, 0.20],
    ]
)
# Text to image, per column (own image score, other images at least as high):
#   t0: 0.9 vs 0.95 -> rank 1;  t1: 0.1 vs 0.6, 0.9 -> 2;  t2: 0.1 vs 0.8, 0.85 -> 2
#   t3: 0.7 vs 0.8 -> 1;        t4: 0.1 vs 0.3, 0.2 -> 2;  t5: 0.2 vs 0.4, 0.3 -> 2
TR_RANKS = [0, 0, 4]
IR_RANKS = [1, 2, 2, 1, 2, 2]


def test_hand_computed_recalls():
    r = retrieval_recall(SCORES, T2I, ks=(1, 2, 5, 10))
    assert r["tr_r1"] == pytest.approx(100 * 2 / 3)
    assert r["tr_r2"] == pytest.approx(100 * 2 / 3)
    assert r["tr_r5"] == pytest.approx(100.0)  # rank 4 < 5
    assert r["tr_r10"] == pytest.approx(100.0)  # clipped to the 6 texts
    assert r["ir_r1"] == pytest.approx(0.0)
    assert r["ir_r2"] == pytest.approx(100 * 2 / 6)
    assert r["ir_r5"] == pytest.approx(100.0)  # clipped to the 3 images
    assert r["ir_r10"] == pytest.approx(100.0)
    recalls = [v for k, v in r.items() if k != "r_mean"]
    assert r["r_mean"] == pytest.approx(sum(recalls) / 8)


def test_default_keys_and_mean_of_six():
    r = retrieval_recall(SCORES, T2I)
    assert list(r) == ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean"]
    assert r["r_mean"] == pytest.approx((100 * 2 / 3 + 100 + 100 + 0 + 100 + 100) / 6)


def test_text_order_does_not_matter():
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    assert retrieval_recall(SCORES[:, perm], T2I[perm]) == pytest.approx(retrieval_recall(SCORES, T2I))


def test_chunked_rows_give_the_same_result(monkeypatch):
    full = retrieval_recall(SCORES, T2I, ks=(1, 2, 3))
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 6)  # one image row per chunk
    assert retrieval_recall(SCORES, T2I, ks=(1, 2, 3)) == full


def test_ties_count_against_the_correct_candidate():
    # Every score equal: each image has 1 text of another image tying with its own -> rank 1 -> miss at 1.
    scores = torch.full((2, 2), 0.5)
    r = retrieval_recall(scores, torch.tensor([0, 1]), ks=(1, 2))
    assert r["tr_r1"] == 0.0 and r["ir_r1"] == 0.0
    assert r["tr_r2"] == 100.0 and r["ir_r2"] == 100.0  # k clipped to 2 candidates: a sure hit


def test_ties_between_correct_texts_are_harmless():
    t2i = torch.tensor([0, 0, 1])
    # Image 0's two texts tie with each other, the other image's text is below: rank 0.
    r = retrieval_recall(torch.tensor([[0.7, 0.7, 0.6], [0.1, 0.2, 0.9]]), t2i, ks=(1,))
    assert r["tr_r1"] == 100.0
    # Now the text of image 1 ties with image 0's best text: rank 1.
    r = retrieval_recall(torch.tensor([[0.7, 0.7, 0.7], [0.1, 0.2, 0.9]]), t2i, ks=(1,))
    assert r["tr_r1"] == 50.0


def test_matches_topk_on_distinct_scores():
    # With no ties the rule is the official one: top-k by torch.topk, a hit if any retrieved item is correct.
    g = torch.Generator().manual_seed(0)
    num_images, per_image = 7, 3
    t2i = torch.arange(num_images).repeat_interleave(per_image)
    scores = torch.randn(num_images, num_images * per_image, generator=g)
    r = retrieval_recall(scores, t2i, ks=(1, 2, 5))
    for k in (1, 2, 5):
        top_texts = scores.topk(k, dim=1).indices
        tr = (t2i[top_texts] == torch.arange(num_images)[:, None]).any(1).float().mean().item() * 100
        top_images = scores.topk(k, dim=0).indices
        ir = (top_images == t2i[None, :]).any(0).float().mean().item() * 100
        assert r[f"tr_r{k}"] == pytest.approx(tr)
        assert r[f"ir_r{k}"] == pytest.approx(ir)


def test_half_precision_scores():
    assert retrieval_recall(SCORES.half(), T2I) == pytest.approx(retrieval_recall(SCORES, T2I))


def test_image_without_text_is_refused():
    with pytest.raises(ValueError, match=r"1 image\(s\) have no text: rows 2"):
        retrieval_recall(torch.rand(3, 4), torch.tensor([0, 0, 1, 1]))


@pytest.mark.parametrize(
    "scores, t2i, error, match",
    [
        (torch.rand(6), T2I, ValueError, "2-D"),
        (torch.rand(3, 5), T2I, ValueError, r"shape \(5,\)"),
        (SCORES, torch.tensor([0, 0, 1, 1, 2, 3]), ValueError, r"outside \[0, 3\): \[5\]=3"),
        (SCORES, torch.tensor([0, 0, 1, 1, 2, -1]), ValueError, "outside"),
        (SCORES, T2I.float(), TypeError, "integers"),
        (torch.ones(3, 6, dtype=torch.long), T2I, TypeError, "floating point"),
        (torch.full((3, 6), float("nan")), T2I, ValueError, "NaN"),
        (torch.rand(0, 6), T2I, ValueError, "empty"),
    ],
)
def test_retrieval_input_errors(scores, t2i, error, match):
    with pytest.raises(error, match=match):
        retrieval_recall(scores, t2i)


def test_bad_ks():
    for ks in [(0,), (), (1.5,), (True,)]:
        with pytest.raises(ValueError):
            retrieval_recall(SCORES, T2I, ks=ks)


# ----------------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------------

LOGITS = torch.tensor(
    [
        [0.1, 0.9, 0.3, 0.2],  # label 1: rank 0
        [0.8, 0.1, 0.5, 0.3],  # label 2: 0.8 above -> rank 1
        [0.4, 0.3, 0.2, 0.1],  # label 3: rank 3
    ]
)
LABELS = torch.tensor([1, 2, 3])


def test_topk_accuracy_hand_computed():
    assert topk_accuracy(LOGITS, LABELS) == pytest.approx({"acc1": 100 / 3, "acc5": 100.0})  # 5 clipped to 4
    r = topk_accuracy(LOGITS, LABELS, ks=(1, 2, 3, 4))
    assert r == pytest.approx({"acc1": 100 / 3, "acc2": 200 / 3, "acc3": 200 / 3, "acc4": 100.0})


def test_topk_ties_count_against_the_label():
    logits = torch.tensor([[0.5, 0.5, 0.1]])
    assert topk_accuracy(logits, torch.tensor([0]), ks=(1, 2)) == {"acc1": 0.0, "acc2": 100.0}
    assert topk_accuracy(logits, torch.tensor([1]), ks=(1,)) == {"acc1": 0.0}


def test_topk_errors():
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        topk_accuracy(LOGITS, torch.tensor([1, 2, 4]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        topk_accuracy(LOGITS, torch.tensor([1, 2]))


def test_accuracy_of_labels_and_logits():
    assert accuracy(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 1, 0])) == 50.0
    assert accuracy([0, 1, 1], [0, 1, 0]) == pytest.approx(200 / 3)
    # logits: argmax, first maximal class on a tie (as torch.argmax, the official code's choice)
    assert accuracy(torch.tensor([[0.2, 0.7], [0.3, 0.3], [0.9, 0.1]]), torch.tensor([1, 0, 1])) == pytest.approx(
        200 / 3
    )


def test_accuracy_errors():
    with pytest.raises(ValueError, match="shape"):
        accuracy(torch.tensor([1, 0]), torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="no samples"):
        accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))


def test_import_is_cheap():
    code = (
        "import sys, imglish.evaluation as e; "
        "assert 'torch' not in sys.modules and not any(m.startswith('pycocoevalcap') for m in sys.modules); "
        "e.caption_backend; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
