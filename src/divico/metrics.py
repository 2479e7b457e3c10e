"""Metric functions that mirror the paper's benchmarks (TextVQA/VQAv2, POPE, MME, MMBench, GQA).

Every metric takes model predictions as free text and does its own answer parsing, so the
evaluation loop only has to decode strings. :func:`score_benchmark` dispatches by benchmark name
on the eval records written by :mod:`divico_testbed.data` (fields ``id``, ``answer``/``answers``,
``split_type``, ``subtask``, ``image``, ``circular_group``...).

Conventions
-----------
* Scores that the paper reports in percent (VQA accuracy, POPE F1, MMBench, GQA, MME acc) are
  returned in percent (0-100); MME subtask scores are ``acc + acc+`` (0-200) and the MME total is
  their sum.
* A prediction that cannot be parsed (no yes/no, no option letter) is counted as wrong and its
  count is reported, never silently dropped.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "normalize_vqa_answer",
    "vqa_soft_accuracy",
    "vqa_accuracy",
    "parse_yes_no",
    "pope_split_metrics",
    "pope_score",
    "mme_scores",
    "extract_option_letter",
    "rotate_options",
    "mmbench_circular_accuracy",
    "normalize_short_answer",
    "exact_match_accuracy",
    "score_benchmark",
    "BENCHMARK_NAMES",
]

BENCHMARK_NAMES: tuple[str, ...] = ("textvqa", "pope", "mme", "mmbench", "gqa")

# --------------------------------------------------------------------------------------------
# VQA soft accuracy (facts of the official VQA evaluation script, re-implemented)
# --------------------------------------------------------------------------------------------

_VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "id've": "i'd've", "i'dve": "i'd've", "im": "i'm",
    "ive": "i've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_VQA_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)
# A period is removed unless a digit follows it ("3.5" keeps its point, "yes." loses it).
_VQA_PERIOD = re.compile(r"\.(?!\d)")
# A comma between digits ("1,000") switches punctuation handling to plain deletion.
_VQA_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def _vqa_process_punctuation(text: str) -> str:
    # The official rule: a mark touching a space, or any text with a digit-comma-digit, has its
    # marks deleted; otherwise marks become spaces ("black/white" -> "black white").
    delete_marks = _VQA_DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        if delete_marks or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _VQA_PERIOD.sub("", out)


def _vqa_process_digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _VQA_NUMBER_WORDS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(_VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer as the official VQA evaluation does.

    Steps: newlines/tabs to spaces and strip; punctuation (marks touching a space or any text with
    a digit-comma-digit are deleted, others become spaces; periods not followed by a digit are
    deleted); lower-case; number words ``zero``..``ten`` (and ``none``) to digits; articles
    ``a``/``an``/``the`` removed; missing-apostrophe contractions restored (``dont`` -> ``don't``).

    Parameters
    ----------
    text : str
        A predicted or reference answer.

    Returns
    -------
    str
        The normalised answer (words joined by single spaces).
    """
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str, got {type(text).__name__}: {text!r}")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_process_digits_articles(_vqa_process_punctuation(text))


def vqa_soft_accuracy(prediction: str, reference_answers: Sequence[str]) -> float:
    """VQA soft accuracy of one prediction against the human reference answers.

    As in the official script, each of the ``n`` (normally 10) references is left out in turn and
    the prediction scores ``min(1, #matching among the other n-1 / 3)``; the result is the mean
    over the ``n`` subsets. Unlike the official script, which normalises only when the references
    disagree, both sides are always normalised (as LLaVA's TextVQA evaluator does), so
    ``"Two."`` matches ``"2"`` even when all references agree.

    Parameters
    ----------
    prediction : str
        The model's answer.
    reference_answers : Sequence[str]
        The human answers (at least 2 so that leave-one-out is defined).

    Returns
    -------
    float
        Accuracy in ``[0, 1]``.
    """
    if isinstance(reference_answers, str) or len(reference_answers) < 2:
        raise ValueError(
            "reference_answers must be a sequence of at least 2 strings, got "
            f"{reference_answers!r}"
        )
    predicted = normalize_vqa_answer(prediction)
    references = [normalize_vqa_answer(answer) for answer in reference_answers]
    total_matches = sum(reference == predicted for reference in references)
    subset_scores = []
    for reference in references:
        # Leaving this reference out removes one match exactly when it matched.
        matches_in_others = total_matches - (reference == predicted)
        subset_scores.append(min(1.0, matches_in_others / 3.0))
    return sum(subset_scores) / len(subset_scores)


def vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean VQA soft accuracy over questions, in percent.

    Parameters
    ----------
    predictions : Sequence[str]
        One answer per question, length ``N``.
    references : Sequence[Sequence[str]]
        ``N`` lists of reference answers.

    Returns
    -------
    float
        Accuracy in ``[0, 100]``.
    """
    _check_same_length(predictions, references)
    scores = [vqa_soft_accuracy(p, r) for p, r in zip(predictions, references, strict=True)]
    return 100.0 * sum(scores) / len(scores)


# --------------------------------------------------------------------------------------------
# Yes/no parsing and POPE
# --------------------------------------------------------------------------------------------

_YES_WORDS = frozenset({"yes", "yeah", "yep", "true", "correct"})
_NO_WORDS = frozenset({"no", "not", "nope", "false", "incorrect", "none", "isn't", "aren't",
                       "doesn't"})
_WORD = re.compile(r"[a-z']+")


def parse_yes_no(text: str) -> str | None:
    """Read a yes/no answer from free text.

    The first word decides when it is a yes/no word (``"Yes."``, ``"yes, there is"``,
    ``"No, there is not"``); otherwise the text is searched for yes words and no words and is
    read as the one that occurs alone.

    Parameters
    ----------
    text : str
        The model's answer.

    Returns
    -------
    str or None
        ``"yes"``, ``"no"``, or None when the answer has no or contradictory yes/no content.
    """
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str, got {type(text).__name__}: {text!r}")
    words = _WORD.findall(text.lower())
    if not words:
        return None
    if words[0] in _YES_WORDS:
        return "yes"
    if words[0] in _NO_WORDS:
        return "no"
    has_yes = any(word in _YES_WORDS for word in words)
    has_no = any(word in _NO_WORDS for word in words)
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return None


def pope_split_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Precision, recall, F1, accuracy and yes-ratio of one POPE split.

    "yes" is the positive class. An unparseable prediction counts as the wrong answer: a false
    negative when the label is "yes", a false positive when it is "no".

    Parameters
    ----------
    predictions : Sequence[str]
        Free-text answers, length ``N``.
    labels : Sequence[str]
        Ground truth, each ``"yes"`` or ``"no"``, length ``N``.

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1``, ``accuracy``, ``yes_ratio`` (share of answers read as
        "yes"), all in percent, plus the counts ``n``, ``tp``, ``fp``, ``tn``, ``fn`` and
        ``unparseable``.
    """
    _check_same_length(predictions, labels)
    tp = fp = tn = fn = unparseable = parsed_yes = 0
    for prediction, label in zip(predictions, labels, strict=True):
        if label not in ("yes", "no"):
            raise ValueError(f"POPE label must be 'yes' or 'no', got {label!r}")
        answer = parse_yes_no(prediction)
        if answer is None:
            unparseable += 1
            answer = "no" if label == "yes" else "yes"
        else:
            parsed_yes += answer == "yes"
        if answer == "yes":
            tp += label == "yes"
            fp += label == "no"
        else:
            tn += label == "no"
            fn += label == "yes"
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "accuracy": 100.0 * (tp + tn) / n,
        "yes_ratio": 100.0 * parsed_yes / n,
        "n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "unparseable": unparseable,
    }


POPE_SPLIT_TYPES: tuple[str, ...] = ("random", "popular", "adversarial")


def pope_score(
    per_split: Mapping[str, tuple[Sequence[str], Sequence[str]]],
) -> dict[str, Any]:
    """POPE benchmark score: the mean F1 over the random / popular / adversarial splits.

    Parameters
    ----------
    per_split : Mapping[str, tuple[Sequence[str], Sequence[str]]]
        ``split_type -> (predictions, labels)`` for split types among ``random``, ``popular``,
        ``adversarial`` (at least one).

    Returns
    -------
    dict
        ``score`` (mean F1, percent), ``splits`` (metrics of each split) and ``unparseable``.
    """
    if not per_split:
        raise ValueError("pope_score needs at least one split, got none")
    unknown = sorted(set(per_split) - set(POPE_SPLIT_TYPES))
    if unknown:
        raise ValueError(f"unknown POPE split types {unknown}; valid: {list(POPE_SPLIT_TYPES)}")
    splits = {name: pope_split_metrics(*per_split[name])
              for name in POPE_SPLIT_TYPES if name in per_split}
    return {
        "score": sum(m["f1"] for m in splits.values()) / len(splits),
        "splits": splits,
        "unparseable": sum(m["unparseable"] for m in splits.values()),
    }


# --------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------


def mme_scores(
    predictions: Sequence[str],
    labels: Sequence[str],
    subtasks: Sequence[str],
    image_ids: Sequence[str],
) -> dict[str, Any]:
    """MME scores: per subtask ``acc + acc+`` (each in percent, so at most 200) and their sum.

    ``acc`` is per question; ``acc+`` is per image and needs every question of the image (the
    yes/no pair) answered correctly. Unparseable answers are wrong.

    Parameters
    ----------
    predictions, labels, subtasks, image_ids : Sequence[str]
        Aligned sequences of length ``N``: the answer, the ``"yes"``/``"no"`` label, the subtask
        name and the image the question belongs to.

    Returns
    -------
    dict
        ``score`` (total over subtasks), ``subtasks`` (``{name: {"acc", "acc_plus", "score",
        "n_questions", "n_images"}}``) and ``unparseable``.
    """
    _check_same_length(predictions, labels, subtasks, image_ids)
    question_correct: dict[str, list[bool]] = defaultdict(list)
    image_correct: dict[str, dict[str, bool]] = defaultdict(dict)
    unparseable = 0
    for prediction, label, subtask, image in zip(
        predictions, labels, subtasks, image_ids, strict=True
    ):
        if label not in ("yes", "no"):
            raise ValueError(f"MME label must be 'yes' or 'no', got {label!r}")
        answer = parse_yes_no(prediction)
        unparseable += answer is None
        correct = answer == label
        question_correct[subtask].append(correct)
        image_correct[subtask][image] = image_correct[subtask].get(image, True) and correct
    per_subtask = {}
    for subtask in sorted(question_correct):
        answers = question_correct[subtask]
        images = image_correct[subtask]
        acc = 100.0 * sum(answers) / len(answers)
        acc_plus = 100.0 * sum(images.values()) / len(images)
        per_subtask[subtask] = {
            "acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
            "n_questions": len(answers), "n_images": len(images),
        }
    return {
        "score": sum(s["score"] for s in per_subtask.values()),
        "subtasks": per_subtask,
        "unparseable": unparseable,
    }


# --------------------------------------------------------------------------------------------
# MMBench (option letters, circular evaluation)
# --------------------------------------------------------------------------------------------

_OPTION_LETTERS = "ABCDEFGHIJ"


def _letters_for(options: Sequence[str] | int) -> str:
    count = options if isinstance(options, int) else len(options)
    if not 2 <= count <= len(_OPTION_LETTERS):
        raise ValueError(f"number of options must be in [2, {len(_OPTION_LETTERS)}], got {count}")
    return _OPTION_LETTERS[:count]


def extract_option_letter(text: str, options: Sequence[str] | int) -> str | None:
    """Read the chosen option letter from a free-text answer.

    Accepted forms, tried in order: a bare letter possibly wrapped or followed by punctuation
    (``"B"``, ``"(B)"``, ``"B."``, ``"B) red"``); ``"answer is B"`` / ``"Answer: B"`` /
    ``"option B"``; a single standalone capital letter among the valid ones in the text; the text
    of exactly one option (case-insensitive) when option texts are given.

    Parameters
    ----------
    text : str
        The model's answer.
    options : Sequence[str] or int
        The option texts in the order shown (letters ``A, B, ...``), or just their number.

    Returns
    -------
    str or None
        The letter, or None when no single valid letter can be read.
    """
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str, got {type(text).__name__}: {text!r}")
    letters = _letters_for(options)
    stripped = text.strip()
    # "A red circle" starts with the article, not with option A.
    article_first = re.match(r"^A\s+[a-z]", stripped) is not None
    leading = re.match(rf"^[\(\[]?([{letters}])(?:[\)\]\.:,]|\s|$)", stripped)
    if leading and not article_first:
        return leading.group(1)
    stated = re.search(
        rf"(?:answer(?:\s+is)?|option|choice)\s*[:\-]?\s*[\(\[]?([{letters}])\b",
        stripped, flags=re.IGNORECASE,
    )
    if stated and stated.group(1).upper() in letters:
        return stated.group(1).upper()
    # Digits bound a letter too: the "C" of a sign text "C45" is not option C.
    standalone = set(re.findall(rf"(?<![A-Za-z0-9'])([{letters}])(?![A-Za-z0-9'])", stripped))
    if re.search(r"(?<![A-Za-z])A\s+[a-z]", stripped):
        standalone.discard("A")
    if len(standalone) == 1:
        return standalone.pop()
    if not isinstance(options, int):
        lowered = stripped.lower().rstrip(".")
        exact = [letters[i] for i, option in enumerate(options) if option.lower() == lowered]
        if len(exact) == 1:
            return exact[0]
        contained = [letters[i] for i, option in enumerate(options)
                     if re.search(rf"\b{re.escape(option.lower())}\b", lowered)]
        if len(contained) == 1:
            return contained[0]
    return None


def rotate_options(options: Sequence[str], answer: str, shift: int) -> tuple[list[str], str]:
    """Rotate multiple-choice options by ``shift`` places, as MMBench's circular evaluation does.

    Parameters
    ----------
    options : Sequence[str]
        Option texts in letter order.
    answer : str
        Correct letter for ``options``.
    shift : int
        Rotation in ``[0, len(options))``; the option at index ``shift`` becomes ``A``.

    Returns
    -------
    tuple[list[str], str]
        The rotated options and the correct letter among them.
    """
    letters = _letters_for(options)
    if answer not in letters:
        raise ValueError(f"answer must be one of {list(letters)}, got {answer!r}")
    if not 0 <= shift < len(options):
        raise ValueError(f"shift must be in [0, {len(options)}), got {shift}")
    rotated = list(options[shift:]) + list(options[:shift])
    new_index = (letters.index(answer) - shift) % len(options)
    return rotated, letters[new_index]


def mmbench_circular_accuracy(
    predictions: Sequence[str],
    answers: Sequence[str],
    options: Sequence[Sequence[str]],
    groups: Sequence[str],
    rotations: Sequence[int],
) -> dict[str, Any]:
    """MMBench circular accuracy: a question counts only if every rotation is answered right.

    Parameters
    ----------
    predictions : Sequence[str]
        Free-text answers, length ``N`` (one per asked rotation).
    answers : Sequence[str]
        Correct letter of each asked rotation.
    options : Sequence[Sequence[str]]
        Option texts as shown in each asked rotation.
    groups : Sequence[str]
        Id of the original question each rotation belongs to.
    rotations : Sequence[int]
        Rotation index of each asked question (0 = original order).

    Returns
    -------
    dict
        ``score`` (circular accuracy, percent), ``vanilla_accuracy`` (rotation 0 only, percent),
        ``per_question_accuracy`` (all rotations pooled, percent), ``n_questions``, ``n_asked``
        and ``unparseable``.
    """
    _check_same_length(predictions, answers, options, groups, rotations)
    all_right: dict[str, bool] = {}
    first_right: dict[str, bool] = {}
    unparseable = correct_asked = 0
    for prediction, answer, shown, group, rotation in zip(
        predictions, answers, options, groups, rotations, strict=True
    ):
        letter = extract_option_letter(prediction, shown)
        unparseable += letter is None
        correct = letter == answer
        correct_asked += correct
        all_right[group] = all_right.get(group, True) and correct
        if rotation == 0:
            first_right[group] = correct
    return {
        "score": 100.0 * sum(all_right.values()) / len(all_right),
        "vanilla_accuracy": (100.0 * sum(first_right.values()) / len(first_right)
                             if first_right else float("nan")),
        "per_question_accuracy": 100.0 * correct_asked / len(predictions),
        "n_questions": len(all_right),
        "n_asked": len(predictions),
        "unparseable": unparseable,
    }


# --------------------------------------------------------------------------------------------
# GQA-like exact match
# --------------------------------------------------------------------------------------------

_SHORT_ANSWER_PUNCTUATION = re.compile(r"[^\w\s']")


def normalize_short_answer(text: str) -> str:
    """Light normalisation for exact match: lower-case, punctuation and articles removed.

    Parameters
    ----------
    text : str
        An answer.

    Returns
    -------
    str
        Normalised answer (``"The Red."`` -> ``"red"``).
    """
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str, got {type(text).__name__}: {text!r}")
    text = _SHORT_ANSWER_PUNCTUATION.sub(" ", text.lower())
    return " ".join(word for word in text.split() if word not in _VQA_ARTICLES)


def exact_match_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Exact-match accuracy after :func:`normalize_short_answer`, in percent.

    Parameters
    ----------
    predictions, answers : Sequence[str]
        Aligned answers and ground truth, length ``N``.

    Returns
    -------
    float
        Accuracy in ``[0, 100]``.
    """
    _check_same_length(predictions, answers)
    hits = sum(normalize_short_answer(p) == normalize_short_answer(a)
               for p, a in zip(predictions, answers, strict=True))
    return 100.0 * hits / len(answers)


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


def _align_predictions(
    predictions: Mapping[str, str] | Sequence[str], records: Sequence[Mapping[str, Any]]
) -> list[str]:
    if not records:
        raise ValueError("records is empty; nothing to score")
    if isinstance(predictions, Mapping):
        missing = [r["id"] for r in records if r["id"] not in predictions]
        if missing:
            raise ValueError(
                f"{len(missing)} records have no prediction, e.g. ids {missing[:5]}"
            )
        return [predictions[r["id"]] for r in records]
    if isinstance(predictions, str) or len(predictions) != len(records):
        raise ValueError(
            "predictions must be a mapping id -> answer or a sequence aligned with records "
            f"(length {len(records)}), got {type(predictions).__name__} of length "
            f"{len(predictions)}"
        )
    return list(predictions)


def score_benchmark(
    name: str,
    predictions: Mapping[str, str] | Sequence[str],
    records: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Score predictions on the eval records of one benchmark.

    Parameters
    ----------
    name : str
        One of ``textvqa``, ``pope``, ``mme``, ``mmbench``, ``gqa``.
    predictions : Mapping[str, str] or Sequence[str]
        ``record id -> answer text``, or answers aligned with ``records``.
    records : Sequence[Mapping[str, Any]]
        Eval records as written by :func:`divico_testbed.data.write_benchmark_splits`.

    Returns
    -------
    dict
        Always ``benchmark``, ``score`` (the paper's headline number: VQA accuracy %, mean POPE
        F1 %, MME total, MMBench circular accuracy %, GQA accuracy %) and ``n``; plus
        benchmark-specific details.
    """
    answers = _align_predictions(predictions, records)
    if name == "textvqa":
        result: dict[str, Any] = {"score": vqa_accuracy(answers, [r["answers"] for r in records])}
        by_category: dict[str, list[float]] = defaultdict(list)
        for answer, record in zip(answers, records, strict=True):
            by_category[record.get("category", "all")].append(
                vqa_soft_accuracy(answer, record["answers"]))
        result["categories"] = {c: 100.0 * sum(v) / len(v) for c, v in sorted(by_category.items())}
    elif name == "pope":
        grouped: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for answer, record in zip(answers, records, strict=True):
            grouped[record["split_type"]][0].append(answer)
            grouped[record["split_type"]][1].append(record["answer"])
        result = pope_score(grouped)
    elif name == "mme":
        result = mme_scores(answers, [r["answer"] for r in records],
                            [r["subtask"] for r in records], [r["image"] for r in records])
    elif name == "mmbench":
        result = mmbench_circular_accuracy(
            answers, [r["answer"] for r in records], [r["options"] for r in records],
            [r.get("circular_group", r["id"]) for r in records],
            [int(r.get("rotation", 0)) for r in records],
        )
    elif name == "gqa":
        result = {"score": exact_match_accuracy(answers, [r["answer"] for r in records])}
    else:
        raise ValueError(f"unknown benchmark {name!r}; valid: {list(BENCHMARK_NAMES)}")
    return {"benchmark": name, "n": len(records), **result}


def _check_same_length(*sequences: Sequence[Any]) -> None:
    lengths = [len(s) for s in sequences]
    if len(set(lengths)) != 1:
        raise ValueError(f"inputs must have equal lengths, got {lengths}")
    if lengths[0] == 0:
        raise ValueError("inputs are empty; nothing to score")
