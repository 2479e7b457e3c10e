"""Metric functions on hand-computed cases: what both rules share, and the lenient rules.

The official rules' own cases (computed from the official scoring code's logic) are in
tests/test_metrics_official.py.
"""

from __future__ import annotations

import math

import pytest

from divico.metrics import (
    exact_match_accuracy,
    extract_option_letter,
    mmbench_circular_accuracy,
    mme_scores,
    normalize_short_answer,
    normalize_vqa_answer,
    parse_yes_no,
    pope_score,
    pope_split_metrics,
    rotate_options,
    score_benchmark,
    vqa_accuracy,
    vqa_soft_accuracy,
)

# --- VQA normalisation and soft accuracy ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Cat", "cat"),                    # articles removed, lower-cased
        ("a dog", "dog"),
        ("an apple", "apple"),
        ("Yes.", "yes"),                       # period not followed by a digit is stripped
        ("3.5", "3.5"),                        # decimal point kept
        ("two", "2"),                          # number words to digits
        ("Two dogs", "2 dogs"),
        ("none", "0"),
        ("dont", "don't"),                     # contractions restored
        ("isnt", "isn't"),
        ("1,000", "1000"),                     # comma between digits deleted
        ("1,000 dogs, two", "1000 dogs 2"),    # digit,digit -> every mark deleted
        ("black/white", "black white"),        # mark not touching a space -> space
        ("well, yes", "well yes"),             # mark touching a space -> deleted
        ("hi!", "hi"),
        ("  red\ncar\t", "red car"),
    ],
)
@pytest.mark.parametrize("rules", ["official", "lenient"])
def test_normalize_vqa_answer(raw: str, expected: str, rules: str) -> None:
    assert normalize_vqa_answer(raw, rules=rules) == expected


@pytest.mark.parametrize("rules", ["official", "lenient"])
def test_vqa_soft_accuracy_hand_computed(rules: str) -> None:
    assert vqa_soft_accuracy("two", ["2"] * 10, rules=rules) == 1.0
    assert vqa_soft_accuracy("The 2.", ["2"] * 10, rules=rules) == 1.0
    assert vqa_soft_accuracy("green", ["2"] * 10, rules=rules) == 0.0
    # 3 of 10 say "violet": leaving out a "violet" leaves 2 matches (2/3), a "purple" 3 (1).
    assert vqa_soft_accuracy("violet", ["purple"] * 7 + ["violet"] * 3, rules=rules) == \
        pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    # 2 of 10 say "red": leaving out a "red" leaves 1 match (1/3), a "blue" 2 (2/3).
    assert vqa_soft_accuracy("red", ["red"] * 2 + ["blue"] * 8, rules=rules) == pytest.approx(
        (2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy(["red", "nope"], [["red"] * 2 + ["blue"] * 8, ["x"] * 10],
                        rules=rules) == pytest.approx(100 * 0.6 / 2)


def test_vqa_soft_accuracy_rejects_bad_references() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        vqa_soft_accuracy("red", ["red"])
    with pytest.raises(ValueError, match="at least 2"):
        vqa_soft_accuracy("red", "red")


# --- POPE -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Yes.", "yes"), ("yes, there is", "yes"), ("YES", "yes"), ("No, there is not.", "no"),
     ("There is no blue star.", "no"), ("I think so, yes", "yes"), ("maybe", None), ("", None),
     ("Not at all", "no")],
)
def test_parse_yes_no_lenient(text: str, expected: str | None) -> None:
    assert parse_yes_no(text, rules="lenient") == expected


def test_pope_split_metrics_two_by_two_table_lenient() -> None:
    labels = ["yes"] * 4 + ["no"] * 5
    predictions = ["Yes.", "yes, there is", "YES", "No",          # TP TP TP FN
                   "yes", "no", "No, there is not.", "Not at all",  # FP TN TN TN
                   "maybe"]                                        # unparseable on "no" -> FP
    metrics = pope_split_metrics(predictions, labels, rules="lenient")
    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"]) == (3, 1, 2, 3)
    assert metrics["unparseable"] == 1
    assert metrics["precision"] == pytest.approx(100 * 3 / 5)
    assert metrics["recall"] == pytest.approx(100 * 3 / 4)
    assert metrics["f1"] == pytest.approx(100 * 2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert metrics["accuracy"] == pytest.approx(100 * 6 / 9)
    assert metrics["yes_ratio"] == pytest.approx(100 * 4 / 9)


@pytest.mark.parametrize("rules", ["official", "lenient"])
def test_pope_score_is_mean_f1_over_splits(rules: str) -> None:
    labels = ["yes", "yes", "no", "no"]
    result = pope_score(rules=rules, per_split={
        "random": (["yes", "no", "no", "no"], labels),        # P=1, R=1/2 -> F1=2/3
        "popular": (["yes", "yes", "no", "no"], labels),      # F1=1
        "adversarial": (["yes", "yes", "yes", "yes"], labels),  # P=1/2, R=1 -> F1=2/3
    })
    assert result["score"] == pytest.approx(100 * (2 / 3 + 1 + 2 / 3) / 3)
    # Accuracies 3/4, 1, 1/2.
    assert result["accuracy"] == pytest.approx(100 * (0.75 + 1 + 0.5) / 3)
    with pytest.raises(ValueError, match="unknown POPE split"):
        pope_score({"hard": (["yes"], ["yes"])})
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_split_metrics(["yes"], ["maybe"])


# --- MME --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rules", ["official", "lenient"])
def test_mme_acc_and_acc_plus(rules: str) -> None:
    predictions = ["yes", "no",          # count/i1: both right
                   "Yes", "yes",         # count/i2: second wrong
                   "Yes.", "No.",        # ocr/i3: both right
                   "no", "hmm"]          # ocr/i4: wrong + unparseable
    labels = ["yes", "no"] * 4
    subtasks = ["count"] * 4 + ["ocr"] * 4
    images = ["i1", "i1", "i2", "i2", "i3", "i3", "i4", "i4"]
    result = mme_scores(predictions, labels, subtasks, images, rules=rules)
    count = result["subtasks"]["count"]
    assert (count["acc"], count["acc_plus"], count["score"]) == (75.0, 50.0, 125.0)
    ocr = result["subtasks"]["ocr"]
    assert (ocr["acc"], ocr["acc_plus"], ocr["score"]) == (50.0, 50.0, 100.0)
    assert result["score"] == 225.0
    assert result["unparseable"] == 1
    # Both are perception subtasks of MME ("ocr" matches "OCR"); no cognition subtask is present.
    assert (result["perception"], result["cognition"]) == (225.0, 0.0)


# --- MMBench ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("B", "B"), ("(C)", "C"), ("D. yellow", "D"), ("A.", "A"), ("A", "A"),
     ("The answer is C.", "C"), ("Answer: B", "B"), ("blue", "A"), ("A red one.", "B"),
     ("I don't know", None), ("E", None)],
)
def test_extract_option_letter_lenient(text: str, expected: str | None) -> None:
    options = ["blue", "red", "green", "yellow"]
    assert extract_option_letter(text, options, rules="lenient") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    # Sign texts with letters among digits are option texts, not letters; a bare letter still is one.
    [("C45", "B"), ("272B4", "D"), ("4MS5C", "A"), ("c45", "B"), ("C", "C"), ("D. 272B4", "D")],
)
@pytest.mark.parametrize("rules", ["official", "lenient"])
def test_extract_option_letter_reads_alphanumeric_option_texts(text: str, expected: str,
                                                               rules: str) -> None:
    assert extract_option_letter(text, ["4MS5C", "C45", "BNG", "272B4"], rules=rules) == expected


def test_rotate_options() -> None:
    assert rotate_options(["w", "x", "y", "z"], "C", 1) == (["x", "y", "z", "w"], "B")
    assert rotate_options(["w", "x", "y", "z"], "A", 3) == (["z", "w", "x", "y"], "B")
    with pytest.raises(ValueError, match="shift"):
        rotate_options(["w", "x", "y", "z"], "A", 4)


@pytest.mark.parametrize("rules", ["official", "lenient"])
def test_mmbench_circular_needs_every_rotation_right(rules: str) -> None:
    options = ["w", "x", "y", "z"]
    rotated = [rotate_options(options, "C", shift) for shift in range(4)]
    answers = [letter for _, letter in rotated] * 2        # correct: C, B, A, D
    shown = [opts for opts, _ in rotated] * 2
    predictions = ["C", "B", "A", "D",                      # q1: all rotations right
                   "C", "B", "C", "D"]                      # q2: rotation 2 wrong
    result = mmbench_circular_accuracy(predictions, answers, shown,
                                       ["q1"] * 4 + ["q2"] * 4, [0, 1, 2, 3] * 2, rules=rules)
    assert result["score"] == 50.0
    assert result["vanilla_accuracy"] == 100.0
    assert result["per_question_accuracy"] == pytest.approx(100 * 7 / 8)
    assert result["n_questions"] == 2


# --- GQA and the dispatcher -------------------------------------------------------------------


def test_exact_match_lenient() -> None:
    assert normalize_short_answer("The Red.", rules="lenient") == "red"
    assert exact_match_accuracy(["Red.", "a circle", "blue"], ["red", "circle", "green"],
                                rules="lenient") == pytest.approx(200 / 3)


def test_score_benchmark_dispatch_and_errors() -> None:
    records = [{"id": "a", "answer": "left"}, {"id": "b", "answer": "above"}]
    result = score_benchmark("gqa", {"a": "Left", "b": "below"}, records)
    assert result["score"] == 50.0 and result["n"] == 2
    assert score_benchmark("gqa", ["left", "above"], records)["score"] == 100.0
    pope = [{"id": str(i), "answer": a, "split_type": "random"}
            for i, a in enumerate(["yes", "no"])]
    assert score_benchmark("pope", ["yes", "yes"], pope)["score"] == pytest.approx(100 * 2 / 3)
    with pytest.raises(ValueError, match="no prediction"):
        score_benchmark("gqa", {"a": "left"}, records)
    with pytest.raises(ValueError, match="unknown benchmark"):
        score_benchmark("vqa9", ["x", "y"], records)
    with pytest.raises(ValueError, match="aligned"):
        score_benchmark("gqa", ["left"], records)
    assert math.isclose(
        score_benchmark("textvqa", ["two"], [{"id": "t", "answers": ["2"] * 10}])["score"], 100.0)
