"""The official scoring rules, on cases computed by hand from the official code's logic.

Sources (read, re-implemented in divico.metrics): VQA's ``vqaEval.py`` (GT-Vision-Lab/VQA), LLaVA's
``m4c_evaluator.py`` (EvalAI answer processor, TextVQA evaluator), ``eval_pope.py``, MME's
``calculation.py``, lmms-eval's ``mmbench_evals.py`` (can_infer) and VQAv2/VizWiz tasks, LLaVA's
``convert_gqa_for_eval.py`` + GQA ``eval.py``. A comment per case says what the official code does.
Each official function also has a case where the lenient rules still give the earlier answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from divico.metrics import (
    BENCHMARK_NAMES,
    MME_COGNITION_SUBTASKS,
    MME_PERCEPTION_SUBTASKS,
    exact_match_accuracy,
    extract_option_letter,
    gqa_accuracy,
    mmbench_circular_accuracy,
    mme_scores,
    normalize_evalai_answer,
    normalize_short_answer,
    normalize_vqa_answer,
    parse_mme_answer,
    parse_yes_no,
    pope_score,
    pope_split_metrics,
    score_benchmark,
    textvqa_accuracy,
    textvqa_soft_accuracy,
    vqa_accuracy,
    vqa_soft_accuracy,
)

# --- VQA normalisation (vqaEval.py processPunctuation + processDigitArticle) -------------------


@pytest.mark.parametrize(
    ("raw", "official", "lenient"),
    [
        # Words are lower-cased before the table look-up and the key is "Im": no match.
        ("im", "im", "i'm"),
        ("Im", "im", "i'm"),
        ("ive", "ive", "i've"),
        # The official table maps "somebody'd" to "somebodyd" (the earlier table had no entry).
        ("somebody'd", "somebodyd", "somebody'd"),
        # "dont" is a lower-case key of the official table.
        ("dont", "don't", "don't"),
        # periodStrip.sub(..., re.UNICODE) passes 32 as the count: 32 of 40 periods go.
        ("." * 40, "." * 8, ""),
    ],
)
def test_normalize_vqa_answer_official_table_and_period_limit(raw: str, official: str,
                                                              lenient: str) -> None:
    assert normalize_vqa_answer(raw) == official
    assert normalize_vqa_answer(raw, rules="lenient") == lenient


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # "," touches a space -> deleted; "two"/"one" -> digits.
        ("Two dogs, one cat", "2 dogs 1 cat"),
        # "(" and ")" touch no space -> spaces; the lone "a" is then an article.
        ("(a)", ""),
        # Each "." is followed by a letter or the end -> deleted; then lower-cased.
        ("U.S.A.", "usa"),
        # "-" touches no space -> space, "t shirt".
        ("t-shirt", "t shirt"),
        # "\d,\d" anywhere -> every mark is deleted, also the "/" that would become a space.
        ("1,000 black/white", "1000 blackwhite"),
        # Outer spaces and newlines go first.
        ("\n the  Cat \t", "cat"),
    ],
)
def test_normalize_vqa_answer_punctuation_rules(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # word_tokenize: "'s" -> " 's" before everything else.
        ("man's hat", "man 's hat"),
        # word_tokenize deletes every "," (no space left for the punctuation step to make).
        ("red,blue", "redblue"),
        # "?" deleted, lower-cased.
        ("What?", "what"),
        # Commas deleted -> "1000"; number word -> digit.
        ("1,000 or Two.", "1000 or 2"),
        # The same official table: "im" stays, "somebody'd" -> "somebodyd".
        ("Im here", "im here"),
        ("somebody'd", "somebodyd"),
    ],
)
def test_normalize_evalai_answer(raw: str, expected: str) -> None:
    assert normalize_evalai_answer(raw) == expected


def test_vqa_and_evalai_normalisation_differ_on_commas() -> None:
    # vqaEval: "," touches no space -> becomes a space; EvalAI deletes commas first.
    assert normalize_vqa_answer("red,blue") == "red blue"
    assert normalize_evalai_answer("red,blue") == "redblue"


# --- VQA soft accuracy --------------------------------------------------------------------------


def test_issue_21_references_are_normalised() -> None:
    # Official (lmms-eval VQAv2): both sides normalised -> "red" == "red" in all 10 subsets.
    assert vqa_soft_accuracy("red", ["Red."] * 10) == 1.0
    # vqaEval.py literally: all references equal -> no normalisation -> "red" != "Red.".
    assert vqa_soft_accuracy("red", ["Red."] * 10, rules="vqaeval") == 0.0
    assert vqa_soft_accuracy("red", ["Red."] * 10, rules="lenient") == 1.0
    # TextVQA (EvalAI processor on every reference) -> "red" too.
    assert textvqa_soft_accuracy("red", ["Red."] * 10) == 1.0


def test_number_word_references() -> None:
    # References "two" -> "2" (manualMap): 10 matches -> 1.
    assert vqa_soft_accuracy("2", ["two"] * 10) == 1.0
    # "Two" x2 -> "2", "three" x8 -> "3": leaving out a "2" leaves 1 match (1/3), a "3" 2 (2/3).
    expected = (2 * (1 / 3) + 8 * (2 / 3)) / 10
    assert vqa_soft_accuracy("2", ["Two"] * 2 + ["three"] * 8) == pytest.approx(expected)
    # The references disagree, so vqaEval.py normalises them too.
    assert vqa_soft_accuracy("2", ["Two"] * 2 + ["three"] * 8, rules="vqaeval") == \
        pytest.approx(expected)
    assert textvqa_soft_accuracy("2", ["Two"] * 2 + ["three"] * 8) == pytest.approx(expected)


def test_unnormalised_disagreeing_references() -> None:
    # 3 "Red." -> "red" among 7 "blue": leaving out a "red" leaves 2 (2/3), a "blue" 3 (1).
    expected = (3 * (2 / 3) + 7 * 1.0) / 10
    for rules in ("official", "vqaeval", "lenient"):
        assert vqa_soft_accuracy("red", ["Red."] * 3 + ["Blue"] * 7, rules=rules) == \
            pytest.approx(expected)


def test_vqaeval_normalises_only_when_references_disagree() -> None:
    # All "2": vqaEval compares the stripped raw prediction "Two." with "2" -> 0.
    assert vqa_soft_accuracy("Two.", ["2"] * 10, rules="vqaeval") == 0.0
    # Only newlines/tabs/outer spaces are handled then: "2\n" -> "2" -> 1.
    assert vqa_soft_accuracy(" 2\n", ["2"] * 10, rules="vqaeval") == 1.0
    assert vqa_soft_accuracy("Two.", ["2"] * 10) == 1.0


def test_vqa_official_and_lenient_contraction_tables_differ() -> None:
    # Official: "im" stays "im" and "i'm" stays "i'm": no match; lenient: "im" -> "i'm": match.
    assert vqa_soft_accuracy("i'm", ["im"] * 10) == 0.0
    assert vqa_soft_accuracy("i'm", ["im"] * 10, rules="lenient") == 1.0


def test_textvqa_uses_the_evalai_processor() -> None:
    # EvalAI deletes the comma: "redblue" == "redblue"; vqaEval makes it "red blue" -> no match.
    assert textvqa_soft_accuracy("red,blue", ["redblue"] * 10) == 1.0
    assert vqa_soft_accuracy("red,blue", ["redblue"] * 10) == 0.0
    # "man's" -> "man 's" on both sides -> match; 3 of 10 -> (3 * 2/3 + 7 * 1) / 10.
    assert textvqa_soft_accuracy("man's", ["man's"] * 3 + ["men"] * 7) == pytest.approx(0.9)
    # Lenient (earlier TextVQA scoring = lenient VQA): "im" -> "i'm" matches "i'm".
    assert textvqa_soft_accuracy("i'm", ["im"] * 10) == 0.0
    assert textvqa_soft_accuracy("i'm", ["im"] * 10, rules="lenient") == 1.0
    # Means in percent: 1.0 and 0.0.
    assert textvqa_accuracy(["red", "x"], [["Red."] * 10, ["y"] * 10]) == pytest.approx(50.0)
    assert vqa_accuracy(["red", "x"], [["Red."] * 10, ["y"] * 10], rules="vqaeval") == 0.0


# --- POPE (eval_pope.py) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "official", "lenient"),
    [
        # No "." -> whole text; words [""] hold no No/not/no -> yes.
        ("", "yes", None),
        # First sentence "Maybe": no negative word -> yes.
        ("Maybe.", "yes", None),
        ("There is a dog.", "yes", None),
        # The words are compared case-sensitively: "NO" is none of No/not/no -> yes.
        ("NO", "yes", "no"),
        ("Nope", "yes", "no"),
        # "Not" (capital N) is not "not" -> yes.
        ("Not really.", "yes", "no"),
        # First sentence "No, there is not", comma deleted -> words ["No", "there", ...] -> no.
        ("No, there is not.", "no", "no"),
        ("There is no dog.", "no", "no"),
        # Only the first sentence counts: "Yes" -> yes.
        ("Yes. But not the red one.", "yes", "yes"),
        # "not" in the first sentence -> no, even after "Yes" (lenient: the first word decides).
        ("Yes, it is not", "no", "yes"),
        # Split on single spaces only: "no\nthere" is one word -> yes.
        ("no\nthere", "yes", "no"),
    ],
)
def test_parse_yes_no_official(text: str, official: str, lenient: str | None) -> None:
    assert parse_yes_no(text) == official
    assert parse_yes_no(text, rules="lenient") == lenient


def test_pope_split_metrics_official() -> None:
    labels = ["yes", "yes", "yes", "no", "no", "no", "no"]
    predictions = ["Yes", "", "NO",                        # yes yes yes -> TP TP TP
                   "Maybe.", "There is no cat.", "no", "Not here."]  # yes no no yes -> FP TN TN FP
    metrics = pope_split_metrics(predictions, labels)
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == (3, 2, 2, 0)
    assert metrics["unparseable"] == 0
    # precision 3/5, recall 3/3, F1 = 2PR/(P+R) = 0.75, accuracy 5/7, yes ratio 5/7.
    assert metrics["precision"] == pytest.approx(60.0)
    assert metrics["recall"] == pytest.approx(100.0)
    assert metrics["f1"] == pytest.approx(75.0)
    assert metrics["accuracy"] == pytest.approx(100 * 5 / 7)
    assert metrics["yes_ratio"] == pytest.approx(100 * 5 / 7)
    # Lenient: "" and "Maybe." unparseable (FN / FP), "NO" -> no (FN), "Not here." -> no (TN).
    lenient = pope_split_metrics(predictions, labels, rules="lenient")
    assert (lenient["tp"], lenient["fp"], lenient["tn"], lenient["fn"]) == (1, 1, 3, 2)
    assert lenient["unparseable"] == 2


def test_pope_score_mean_over_splits_official() -> None:
    labels = ["yes", "no"]
    result = pope_score({
        "random": (["Yes", "No"], labels),          # TP TN: F1 1, accuracy 1
        "popular": (["NO", "Nope"], labels),        # both yes: TP FP: P 1/2 R 1 -> F1 2/3, acc 1/2
        "adversarial": (["no", "no"], labels),      # FN TN: no TP -> F1 0, acc 1/2
    })
    assert result["score"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    assert result["accuracy"] == pytest.approx(100 * (1 + 0.5 + 0.5) / 3)
    assert set(result["splits"]) == {"random", "popular", "adversarial"}


# --- MME (calculation.py) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "official", "lenient"),
    [
        # "yeah"[:4] holds neither "yes" nor "no" -> other.
        ("Yeah", None, "yes"),
        ("Correct", None, "yes"),
        # "the answer is yes"[:4] = "the " -> other.
        ("The answer is yes", None, "yes"),
        ("Yes", "yes", "yes"),
        # "no."[:4] holds "no".
        ("No.", "no", "no"),
        ("Nope", "no", "no"),
        # "not "[:4] holds "no".
        ("Not sure", "no", "no"),
        # "snow"[:4] holds "no" -> no (a first-characters rule, not a word rule).
        ("Snow", "no", None),
        # "yes,"[:4]: "yes" is tested first.
        ("yes, but no", "yes", "yes"),
    ],
)
def test_parse_mme_answer_official(text: str, official: str | None, lenient: str | None) -> None:
    assert parse_mme_answer(text) == official
    assert parse_mme_answer(text, rules="lenient") == lenient


def test_mme_scores_official_totals() -> None:
    predictions = ["Yes", "No",          # existence/i1: both right
                   "Yeah", "no",         # OCR/i2: "Yeah" is other (wrong), "no" right
                   "yes", "yes",         # code_reasoning/i3: second wrong
                   "Yes", "No"]          # mystery/i4: both right
    labels = ["Yes", "No"] * 4           # calculation.py lower-cases the labels
    subtasks = ["existence"] * 2 + ["OCR"] * 2 + ["code_reasoning"] * 2 + ["mystery"] * 2
    images = ["i1", "i1", "i2", "i2", "i3", "i3", "i4", "i4"]
    result = mme_scores(predictions, labels, subtasks, images)
    # existence: acc 100 + acc+ 100; OCR: 50 + 0; code_reasoning: 50 + 0; mystery: 200.
    assert result["subtasks"]["existence"]["score"] == 200.0
    assert result["subtasks"]["OCR"]["score"] == 50.0
    assert result["subtasks"]["code_reasoning"]["score"] == 50.0
    assert (result["perception"], result["cognition"]) == (250.0, 50.0)
    assert result["unclassified_subtasks"] == ["mystery"]
    assert result["score"] == 500.0
    assert result["unparseable"] == 1
    # Lenient: "Yeah" is yes -> OCR both right (200); labels must be lower-case there.
    lenient = mme_scores(predictions, [label.lower() for label in labels], subtasks, images,
                         rules="lenient")
    assert lenient["subtasks"]["OCR"]["score"] == 200.0
    assert lenient["unparseable"] == 0
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        mme_scores(["yes"], ["Yes"], ["count"], ["i"], rules="lenient")


def test_mme_subtask_lists() -> None:
    # calculation.py: 10 perception and 4 cognition subtasks.
    assert len(MME_PERCEPTION_SUBTASKS) == 10 and len(MME_COGNITION_SUBTASKS) == 4
    assert "OCR" in MME_PERCEPTION_SUBTASKS and "text_translation" in MME_COGNITION_SUBTASKS


# --- MMBench (lmms-eval can_infer) -------------------------------------------------------------

_PLANES = ["F-16 fighter", "Boeing 747", "B-52 bomber", "Cessna 172"]
_PETS = ["dog", "cat", "bird", "fish"]


@pytest.mark.parametrize(
    ("text", "options", "official", "lenient"),
    [
        # No letter token ("B-52" is not "B"); only option C's text is contained -> C.
        ("The image shows B-52 bomber", _PLANES, "C", "B"),
        # One bare letter token "A" and only 2 tokens (the article check needs > 3) -> A.
        ("A cat", _PETS, "A", "B"),
        # "A" with > 3 tokens may be an article: skipped; no wrapped letter; text "cat" -> B.
        ("A cat is on the mat", _PETS, "B", "B"),
        # The matcher reads A-E whatever the options: "E" (then scored wrong).
        ("E", _PETS, "E", None),
        # Substring, not word match: "cat" is inside "cats" -> B.
        ("cats", _PETS, "B", None),
        # Two bare letters -> no wrapped form with one letter -> texts: none -> None
        # (lenient takes the leading letter).
        ("B or C", _PETS, None, "B"),
        # Wrapped "(D)." (prefix "(", suffix ").") -> D.
        ("(D).", _PETS, "D", "D"),
        # Two option texts contained -> None.
        ("dog and cat", _PETS, None, None),
        ("Failed to obtain answer via API", _PETS, None, None),
    ],
)
def test_extract_option_letter_official(text: str, options: list[str], official: str | None,
                                        lenient: str | None) -> None:
    assert extract_option_letter(text, options) == official
    assert extract_option_letter(text, options, rules="lenient") == lenient


def test_mmbench_circular_official() -> None:
    # q1 answered by option text in every rotation; q2 reads "A cat" as A in rotation 1.
    options = [_PETS, _PETS[1:] + _PETS[:1]]          # rotation 0: cat = B; rotation 1: cat = A
    predictions = ["cat", "cat", "cat", "A cat"]
    answers = ["B", "A", "B", "A"]
    result = mmbench_circular_accuracy(predictions, answers, options * 2,
                                       ["q1", "q1", "q2", "q2"], [0, 1, 0, 1])
    assert result["score"] == 100.0
    # Rotation 0 of a third question answered "A cat" (cat = B): official A (wrong), lenient
    # reads the option text "cat" (B).
    third = mmbench_circular_accuracy(["A cat"], ["B"], [_PETS], ["q3"], [0])
    assert third["score"] == 0.0
    assert mmbench_circular_accuracy(["A cat"], ["B"], [_PETS], ["q3"], [0],
                                     rules="lenient")["score"] == 100.0


# --- GQA (convert_gqa_for_eval.py + eval.py) -------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "answer", "official", "lenient"),
    [
        # rstrip(".").lower() -> "the red" != "red": articles stay.
        ("The red", "red", False, True),
        # Hyphens stay: "t shirt" != "t-shirt".
        ("t shirt", "t-shirt", False, True),
        # Trailing periods go: "left" == "left".
        ("Left..", "left", True, True),
        # eval.py compares with the answer as stored: "red" != "Red".
        ("red", "Red", False, True),
        (" yes ", "yes", True, True),
    ],
)
def test_gqa_exact_match_official(prediction: str, answer: str, official: bool,
                                  lenient: bool) -> None:
    assert exact_match_accuracy([prediction], [answer]) == (100.0 if official else 0.0)
    assert gqa_accuracy([prediction], [answer]) == (100.0 if official else 0.0)
    assert exact_match_accuracy([prediction], [answer], rules="lenient") == \
        (100.0 if lenient else 0.0)


def test_normalize_short_answer_official() -> None:
    assert normalize_short_answer("The Red.") == "the red"
    assert normalize_short_answer("The Red.", rules="lenient") == "red"


# --- The dispatcher and the rules keyword ---------------------------------------------------------


def test_score_benchmark_vqav2_vizwiz_and_rules() -> None:
    assert BENCHMARK_NAMES[:5] == ("textvqa", "pope", "mme", "mmbench", "gqa")
    assert "vqav2" in BENCHMARK_NAMES and "vizwiz" in BENCHMARK_NAMES
    records = [{"id": "a", "answers": ["Red."] * 10, "category": "color"},
               {"id": "b", "answers": ["2"] * 3 + ["3"] * 7, "category": "count"}]
    result = score_benchmark("vqav2", {"a": "red", "b": "two"}, records)
    # a: 1.0; b: 3 matches -> (3 * 2/3 + 7) / 10 = 0.9.
    assert result["score"] == pytest.approx(100 * (1.0 + 0.9) / 2)
    assert result["categories"] == pytest.approx({"color": 100.0, "count": 90.0})
    assert result["rules"] == "official" and result["n"] == 2
    vizwiz = [{"id": "u", "answers": ["unanswerable"] * 8 + ["dog"] * 2,
               "answer_type": "unanswerable"},
              {"id": "v", "answers": ["dog"] * 10, "answer_type": "other"}]
    # "Unanswerable." -> "unanswerable": 8 matches -> 1.0; "A cat" -> "cat": no match -> 0.
    scored = score_benchmark("vizwiz", ["Unanswerable.", "A cat"], vizwiz)
    assert scored["score"] == pytest.approx(50.0)
    assert scored["categories"] == {"other": 0.0, "unanswerable": 100.0}
    pope = [{"id": "p", "answer": "no", "split_type": "random"},
            {"id": "q", "answer": "yes", "split_type": "random"}]
    # Official: "Nope" is yes -> FP, TP: P 1/2, R 1 -> F1 2/3; lenient: TN, TP -> F1 1.
    assert score_benchmark("pope", ["Nope", "Yes"], pope)["score"] == pytest.approx(200 / 3)
    assert score_benchmark("pope", ["Nope", "Yes"], pope, rules="lenient")["score"] == 100.0


_RULED: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
    (normalize_vqa_answer, ("red",)),
    (vqa_soft_accuracy, ("red", ["red", "red"])),
    (vqa_accuracy, (["red"], [["red", "red"]])),
    (textvqa_soft_accuracy, ("red", ["red", "red"])),
    (textvqa_accuracy, (["red"], [["red", "red"]])),
    (parse_yes_no, ("yes",)),
    (parse_mme_answer, ("yes",)),
    (pope_split_metrics, (["yes"], ["yes"])),
    (pope_score, ({"random": (["yes"], ["yes"])},)),
    (mme_scores, (["yes"], ["yes"], ["count"], ["i"])),
    (extract_option_letter, ("A", 4)),
    (mmbench_circular_accuracy, (["A"], ["A"], [_PETS], ["q"], [0])),
    (normalize_short_answer, ("red",)),
    (exact_match_accuracy, (["red"], ["red"])),
    (gqa_accuracy, (["red"], ["red"])),
    (score_benchmark, ("gqa", ["red"], [{"id": "r", "answer": "red"}])),
]


@pytest.mark.parametrize(("function", "args"), _RULED, ids=lambda f: getattr(f, "__name__", ""))
def test_rules_keyword_is_validated(function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    function(*args, rules="lenient")
    with pytest.raises(ValueError, match=r"rules must be one of \['official'.*got 'strict'"):
        function(*args, rules="strict")
