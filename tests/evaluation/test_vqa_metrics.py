"""VQA accuracy of the official evaluation: answer processing and leave-one-out scoring, computed by hand."""

from __future__ import annotations

import pytest

from imglish.evaluation.metrics import process_digit_article, process_punctuation, vqa_accuracy, vqa_scores

OTHERS = ["no", "maybe", "blue", "red", "green", "cat", "dog"]  # 7 distinct non-matching answers


def full(text: str) -> str:
    return process_digit_article(process_punctuation(text))


# ----------------------------------------------------------------------------------------------------------------
# Leave-one-out scoring
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "matching, expected",
    [
        # 3 of 10 match: the 7 others left out leave 3 matches (min(1, 3/3) = 1), the 3 matching left out leave 2
        # (2/3): (7 * 1 + 3 * 2/3) / 10 = 0.9.
        (3, (7 * 1 + 3 * 2 / 3) / 10),
        # 1 of 10: 9 * (1/3) + 1 * 0 -> 0.3.
        (1, (9 * (1 / 3) + 1 * 0) / 10),
        # 2 of 10: 8 * (2/3) + 2 * (1/3) -> 0.6.
        (2, (8 * (2 / 3) + 2 * (1 / 3)) / 10),
        # 4 of 10: every left-out case leaves at least 3 -> 1.
        (4, 1.0),
        (0, 0.0),
    ],
)
def test_leave_one_out(matching, expected):
    answers = ["yes"] * matching + (OTHERS + ["one", "two", "three"])[: 10 - matching]
    assert vqa_scores(["yes"], [answers]) == [pytest.approx(expected, abs=1e-12)]


def test_three_of_ten_is_point_nine():
    answers = ["yes", "yes", "yes"] + OTHERS
    assert vqa_scores(["yes"], [answers])[0] == pytest.approx(0.9, abs=1e-12)


def test_accuracy_is_percent_mean_of_questions():
    answers_a = ["yes"] * 3 + OTHERS  # 0.9
    answers_b = ["yes"] + OTHERS + ["x", "y"]  # 0.3
    assert vqa_accuracy(["yes", "yes"], [answers_a, answers_b]) == pytest.approx(60.0, abs=1e-9)


def test_answer_count_other_than_ten():
    # 4 answers, 2 matching: leaving out a match leaves 1 (1/3), leaving out a non-match leaves 2 (2/3).
    assert vqa_scores(["cat"], [["cat", "cat", "dog", "cow"]])[0] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 / 3) / 4)


# ----------------------------------------------------------------------------------------------------------------
# Answer processing
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, processed",
    [
        ("Two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("a circle", "circle"),
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("yes.", "yes"),
        ("Yes!", "yes"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("oclock", "o'clock"),
        ("10:30", "10:30"),  # ':' is not in the punctuation list
        ("2.5", "2.5"),  # a period followed by a digit stays
        (".5", ".5"),
        ("2.", "2"),  # a period not followed by a digit goes, even after a digit
        ("1,000", "1000"),  # digit comma digit: every listed punctuation character is deleted
        ("red, white", "red white"),  # ',' touches a space: deleted
        ("black/white", "black white"),  # '/' touches no space: becomes a space
        ("t-shirt", "t shirt"),
        ("left - right", "left right"),
        ("im", "im"),  # the table's "Im" key is capitalised and never matches lower-cased words
        ("dog's", "dog's"),
        ("  spaced\tout ", "spaced out"),
    ],
)
def test_processing(raw, processed):
    assert full(raw) == processed


def test_punctuation_step_alone_keeps_case_and_articles():
    assert process_punctuation("The Cat?") == "The Cat "
    assert process_punctuation("a (big) dog") == "a big dog"  # "(" touches a space: both brackets deleted


def test_period_strip_limit_of_the_official_code():
    # The official code passes re.UNICODE (32) as `count`: at most 32 periods are removed.
    assert process_punctuation("." * 40) == "." * 8


# ----------------------------------------------------------------------------------------------------------------
# When the human answers are processed ("current" rules vs the 2017 release)
# ----------------------------------------------------------------------------------------------------------------


def test_differing_answers_are_fully_processed_under_current_rules():
    # Not all identical: predictions and answers both go through punctuation + digit/article processing.
    assert vqa_scores(["Two"], [["2"] * 9 + ["two"]], rules="current") == [1.0]
    assert vqa_scores(["2"], [["two"] * 3 + ["three"] * 7], rules="current")[0] == pytest.approx(0.9)
    assert vqa_scores(["a circle"], [["circle"] * 5 + ["round"] * 5], rules="current") == [1.0]
    assert vqa_scores(["circle"], [["a circle"] * 3 + OTHERS], rules="current")[0] == pytest.approx(0.9)
    assert vqa_scores(["dont"], [["don't"] * 3 + OTHERS], rules="current")[0] == pytest.approx(0.9)
    assert vqa_scores(["yes."], [["yes"] * 3 + OTHERS], rules="current")[0] == pytest.approx(0.9)


def test_identical_answers_are_compared_raw_under_current_rules():
    # All ten identical: nothing is processed, only stripped, so "two" does not match "2".
    assert vqa_scores(["two"], [["2"] * 10], rules="current") == [0.0]
    assert vqa_scores(["yes."], [["yes"] * 10], rules="current") == [0.0]
    assert vqa_scores(["Yes"], [["yes"] * 10], rules="current") == [0.0]
    assert vqa_scores([" yes\n"], [["yes"] * 10], rules="current") == [1.0]
    assert vqa_scores(["yes"], [["yes "] * 9 + ["yes"]], rules="current") == [1.0]  # stripped before the identity test


def test_default_rules_are_the_2017_release_as_the_issue_describes():
    assert vqa_scores(["two"], [["2"] * 10]) == vqa_scores(["two"], [["2"] * 10], rules="2017") == [1.0]


def test_2017_rules_always_process_the_prediction():
    # The v2.0 release processes the prediction always, so "two" matches ten "2".
    assert vqa_scores(["two"], [["2"] * 10], rules="2017") == [1.0]
    assert vqa_scores(["yes."], [["yes"] * 10], rules="2017") == [1.0]
    # ...but differing answers get the punctuation step only: "two" and "a circle" stay as they are.
    assert vqa_scores(["2"], [["two"] * 3 + ["three"] * 7], rules="2017") == [0.0]
    assert vqa_scores(["a circle"], [["a circle"] * 3 + OTHERS], rules="2017") == [0.0]
    assert vqa_scores(["yes"], [["yes."] * 3 + OTHERS], rules="2017")[0] == pytest.approx(0.9)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError, match=r"2 predictions but 1 answer"):
        vqa_accuracy(["a", "b"], [["a"]])


def test_question_without_answers_is_named():
    with pytest.raises(ValueError, match=r"question 1 has no answers"):
        vqa_scores(["a", "b"], [["a"], []])


def test_answers_given_as_a_string():
    with pytest.raises(TypeError, match=r"answers\[0\]"):
        vqa_scores(["yes"], ["yes"])


def test_no_questions_and_unknown_rules():
    with pytest.raises(ValueError, match="no questions"):
        vqa_accuracy([], [])
    with pytest.raises(ValueError, match="rules"):
        vqa_scores(["a"], [["a"]], rules="2015")
