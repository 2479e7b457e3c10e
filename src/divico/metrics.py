"""Metric functions of the paper's benchmarks, with the official scoring rules by default.

Every metric takes model predictions as free text and does its own answer parsing, so the
evaluation loop only has to decode strings. :func:`score_benchmark` dispatches by benchmark name
on eval records (fields ``id``, ``answer``/``answers``, ``split_type``, ``subtask``, ``image``,
``options``, ``circular_group``, ``rotation``...), the format of :mod:`divico_testbed.data`.

Scoring rules
-------------
Every scoring function takes ``rules="official"`` (the default) or ``rules="lenient"``:

``"official"``
    the rules of the code that published numbers come from, re-implemented from its logic:

    * VQAv2: the VQA evaluation's normalisation (``vqaEval.py``: its contraction table verbatim,
      number words, articles, punctuation) of the prediction and of every reference, and the mean
      over the 10 leave-one-out subsets of ``min(1, matches / 3)``, as lmms-eval's VQAv2 task
      scores it. ``vqaEval.py`` itself normalises only when the references disagree; that variant
      is ``rules="vqaeval"`` of :func:`vqa_soft_accuracy`.
    * TextVQA and VizWiz: LLaVA's ``m4c_evaluator.py`` (= lmms-eval's TextVQA and VizWiz tasks):
      the EvalAI answer processor on the prediction and every reference, same soft accuracy.
    * POPE: ``evaluate.py`` of POPE (= LLaVA's ``eval_pope.py``): the first sentence is read as
      "no" when its space-separated words contain ``No``, ``not`` or ``no``, otherwise as "yes".
    * MME: ``calculation.py`` of MME's eval tool: the lower-cased answer is "yes"/"no" when it is
      exactly that, else its first 4 characters decide (``yes`` inside, then ``no`` inside), else
      "other" (wrong); ``acc + acc+`` per subtask, perception and cognition totals.
    * MMBench: lmms-eval's rule-based matcher (``can_infer``: a single option letter token, then a
      single option text contained in the answer), circular evaluation.
    * GQA: LLaVA's ``convert_gqa_for_eval.py`` (``rstrip('.')``, lower-case) and GQA's ``eval.py``
      (exact string match with the answer).

``"lenient"``
    this package's earlier parsing, kept for comparison: synonyms and partial answers are read
    (``"Yeah"`` as yes, an option text contained as a word), articles and punctuation are stripped
    for GQA. Its scores are not comparable with published numbers.

Conventions
-----------
* Scores that the paper reports in percent (VQA accuracy, POPE F1, MMBench, GQA, MME acc) are
  returned in percent (0-100); MME subtask scores are ``acc + acc+`` (0-200) and the MME score is
  their sum over all subtasks (perception + cognition).
* A prediction that cannot be parsed (MME "other", no MMBench option) is counted as wrong and its
  count is reported as ``unparseable``, never silently dropped. POPE's official rule reads every
  answer, so its count is 0 there.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
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
    "SCORING_RULES",
    "VQA_RULES",
    "POPE_SPLIT_TYPES",
    "MME_PERCEPTION_SUBTASKS",
    "MME_COGNITION_SUBTASKS",
    "normalize_evalai_answer",
    "textvqa_soft_accuracy",
    "textvqa_accuracy",
    "parse_mme_answer",
    "gqa_accuracy",
]

BENCHMARK_NAMES: tuple[str, ...] = (
    "textvqa", "pope", "mme", "mmbench", "gqa", "vqav2", "vizwiz",
)
#: The values of every scoring function's ``rules`` keyword.
SCORING_RULES: tuple[str, ...] = ("official", "lenient")
#: :func:`vqa_soft_accuracy` also takes ``"vqaeval"``: ``vqaEval.py`` literally (its docstring).
VQA_RULES: tuple[str, ...] = ("official", "vqaeval", "lenient")


def _check_rules(rules: str, valid: tuple[str, ...] = SCORING_RULES) -> None:
    if rules not in valid:
        raise ValueError(f"rules must be one of {list(valid)}, got {rules!r}")


def _check_text(text: Any) -> None:
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str, got {type(text).__name__}: {text!r}")


# --------------------------------------------------------------------------------------------
# VQA answer normalisation (facts of the official VQA evaluation script, re-implemented)
# --------------------------------------------------------------------------------------------

# vqaEval.py's table verbatim (the EvalAI processor of LLaVA/lmms-eval holds the same 120 entries).
# Its capitalised keys ("Im", "Ive") never match, because words are lower-cased before the look-up,
# and "somebody'd" maps to "somebodyd".
_VQA_CONTRACTIONS_OFFICIAL: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# This package's earlier table (lower-cased keys, "im" -> "i'm"): the lenient rules only.
_VQA_CONTRACTIONS_LENIENT: dict[str, str] = {
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
# vqaEval.py's periodStrip as written; its "(?!<=\d)" is a look-ahead for the text "<=" + digit,
# which never precedes a ".", so a period is removed unless a digit follows it ("3.5" keeps it).
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# vqaEval.py passes re.UNICODE (32) where re.sub takes its count: at most 32 periods go.
_VQA_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)
# A comma between digits ("1,000") switches punctuation handling to plain deletion
# (vqaEval.py's commaStrip; the EvalAI processor's "(?<=\d)(\,)+(?=\d)" also takes "1,,0").
_VQA_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_EVALAI_DIGIT_COMMAS_DIGIT = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _vqa_process_punctuation(text: str, digit_comma: re.Pattern[str], period_count: int) -> str:
    # The official rule: a mark touching a space, or any text with a digit-comma-digit, has its
    # marks deleted; otherwise marks become spaces ("black/white" -> "black white"). The test
    # reads the input text, the replacements accumulate on the output.
    delete_marks = digit_comma.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        if delete_marks or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _VQA_PERIOD.sub("", out, count=period_count)


def _vqa_process_digits_articles(text: str, contractions: Mapping[str, str]) -> str:
    words = []
    for word in text.lower().split():
        word = _VQA_NUMBER_WORDS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(contractions.get(word, word))
    return " ".join(words)


def _vqa_strip_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str, *, rules: str = "official") -> str:
    """Normalise an answer as the official VQA evaluation (``vqaEval.py``) does.

    Steps: newlines/tabs to spaces and strip; punctuation (marks touching a space or any text with
    a digit-comma-digit are deleted, others become spaces; periods not followed by a digit are
    deleted, at most 32 as in the official call); lower-case; number words ``zero``..``ten`` (and
    ``none``) to digits; articles ``a``/``an``/``the`` removed; the official contraction table
    (``"dont"`` -> ``"don't"``; ``"im"`` stays ``"im"``, ``"somebody'd"`` -> ``"somebodyd"``).

    Parameters
    ----------
    text : str
        A predicted or reference answer.
    rules : {"official", "lenient"}
        ``"lenient"``: this package's earlier table (``"im"`` -> ``"i'm"``), no period limit.

    Returns
    -------
    str
        The normalised answer (words joined by single spaces).
    """
    _check_text(text)
    _check_rules(rules)
    text = _vqa_strip_whitespace(text)
    if rules == "official":
        text = _vqa_process_punctuation(text, _VQA_DIGIT_COMMA_DIGIT, _VQA_OFFICIAL_PERIOD_COUNT)
        return _vqa_process_digits_articles(text, _VQA_CONTRACTIONS_OFFICIAL)
    text = _vqa_process_punctuation(text, _VQA_DIGIT_COMMA_DIGIT, 0)
    return _vqa_process_digits_articles(text, _VQA_CONTRACTIONS_LENIENT)


def normalize_evalai_answer(text: str) -> str:
    """Normalise an answer as the EvalAI answer processor (TextVQA, VizWiz in LLaVA/lmms-eval).

    First lower-case, delete every ``","`` and ``"?"``, write ``"'s"`` as ``" 's"``
    (``"man's"`` -> ``"man 's"``), then the VQA steps of :func:`normalize_vqa_answer`.

    Parameters
    ----------
    text : str
        A predicted or reference answer.

    Returns
    -------
    str
        The normalised answer.
    """
    _check_text(text)
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _vqa_strip_whitespace(text)
    text = _vqa_process_punctuation(text, _EVALAI_DIGIT_COMMAS_DIGIT, _VQA_OFFICIAL_PERIOD_COUNT)
    return _vqa_process_digits_articles(text, _VQA_CONTRACTIONS_OFFICIAL)


# --------------------------------------------------------------------------------------------
# VQA soft accuracy (VQAv2, TextVQA, VizWiz)
# --------------------------------------------------------------------------------------------


def _check_references(reference_answers: Sequence[str]) -> None:
    if isinstance(reference_answers, str) or len(reference_answers) < 2:
        raise ValueError(
            "reference_answers must be a sequence of at least 2 strings, got "
            f"{reference_answers!r}"
        )
    for answer in reference_answers:
        _check_text(answer)


def _leave_one_out_accuracy(predicted: str, references: Sequence[str]) -> float:
    # Each reference is left out in turn; the prediction scores min(1, matches among the others
    # / 3); leaving a reference out removes one match exactly when it matched.
    total_matches = sum(reference == predicted for reference in references)
    subset_scores = [min(1.0, (total_matches - (reference == predicted)) / 3.0)
                     for reference in references]
    return sum(subset_scores) / len(subset_scores)


def vqa_soft_accuracy(
    prediction: str, reference_answers: Sequence[str], *, rules: str = "official"
) -> float:
    """VQA soft accuracy of one prediction against the human reference answers.

    Each of the ``n`` (normally 10) references is left out in turn and the prediction scores
    ``min(1, #matching among the other n-1 / 3)``; the result is the mean over the ``n`` subsets.

    Parameters
    ----------
    prediction : str
        The model's answer.
    reference_answers : Sequence[str]
        The human answers (at least 2 so that leave-one-out is defined).
    rules : {"official", "vqaeval", "lenient"}
        ``"official"``: the prediction and every reference normalised by
        :func:`normalize_vqa_answer` (lmms-eval's VQAv2 task; LLaVA normalises its VQAv2
        predictions before submission), so ``"red"`` scores 1 against ten ``"Red."``.
        ``"vqaeval"``: ``vqaEval.py`` literally: newlines/tabs/outer spaces only, and the full
        normalisation of both sides only when the references are not all equal (ten ``"Red."``
        then give ``"red"`` 0). The two differ only when every reference is the same string.
        ``"lenient"``: both sides with this package's earlier normalisation.

    Returns
    -------
    float
        Accuracy in ``[0, 1]``.
    """
    _check_rules(rules, VQA_RULES)
    _check_text(prediction)
    _check_references(reference_answers)
    if rules == "vqaeval":
        predicted = _vqa_strip_whitespace(prediction)
        references = [_vqa_strip_whitespace(answer) for answer in reference_answers]
        if len(set(references)) > 1:
            predicted = normalize_vqa_answer(predicted)
            references = [normalize_vqa_answer(answer) for answer in references]
    else:
        predicted = normalize_vqa_answer(prediction, rules=rules)
        references = [normalize_vqa_answer(answer, rules=rules) for answer in reference_answers]
    return _leave_one_out_accuracy(predicted, references)


def textvqa_soft_accuracy(
    prediction: str, reference_answers: Sequence[str], *, rules: str = "official"
) -> float:
    """TextVQA (and VizWiz) soft accuracy as LLaVA's ``TextVQAAccuracyEvaluator`` computes it.

    The prediction and every reference go through :func:`normalize_evalai_answer`; the score is
    the leave-one-out mean of ``min(1, matches / 3)`` (the official code asserts exactly 10
    references; any ``n >= 2`` is accepted here, with the same formula).

    Parameters
    ----------
    prediction : str
        The model's answer.
    reference_answers : Sequence[str]
        The human answers (at least 2).
    rules : {"official", "lenient"}
        ``"lenient"``: :func:`vqa_soft_accuracy` with ``rules="lenient"`` (this package's earlier
        TextVQA scoring).

    Returns
    -------
    float
        Accuracy in ``[0, 1]``.
    """
    _check_rules(rules)
    if rules == "lenient":
        return vqa_soft_accuracy(prediction, reference_answers, rules="lenient")
    _check_text(prediction)
    _check_references(reference_answers)
    return _leave_one_out_accuracy(
        normalize_evalai_answer(prediction),
        [normalize_evalai_answer(answer) for answer in reference_answers],
    )


def vqa_accuracy(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, rules: str = "official"
) -> float:
    """Mean VQA soft accuracy (:func:`vqa_soft_accuracy`) over questions, in percent.

    Parameters
    ----------
    predictions : Sequence[str]
        One answer per question, length ``N``.
    references : Sequence[Sequence[str]]
        ``N`` lists of reference answers.
    rules : {"official", "vqaeval", "lenient"}
        See :func:`vqa_soft_accuracy`.

    Returns
    -------
    float
        Accuracy in ``[0, 100]``.
    """
    _check_rules(rules, VQA_RULES)
    _check_same_length(predictions, references)
    scores = [vqa_soft_accuracy(p, r, rules=rules)
              for p, r in zip(predictions, references, strict=True)]
    return 100.0 * sum(scores) / len(scores)


def textvqa_accuracy(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, rules: str = "official"
) -> float:
    """Mean TextVQA soft accuracy (:func:`textvqa_soft_accuracy`) over questions, in percent.

    Parameters
    ----------
    predictions : Sequence[str]
        One answer per question, length ``N``.
    references : Sequence[Sequence[str]]
        ``N`` lists of reference answers.
    rules : {"official", "lenient"}
        See :func:`textvqa_soft_accuracy`.

    Returns
    -------
    float
        Accuracy in ``[0, 100]``.
    """
    _check_rules(rules)
    _check_same_length(predictions, references)
    scores = [textvqa_soft_accuracy(p, r, rules=rules)
              for p, r in zip(predictions, references, strict=True)]
    return 100.0 * sum(scores) / len(scores)


# --------------------------------------------------------------------------------------------
# Yes/no parsing: POPE and MME
# --------------------------------------------------------------------------------------------

_YES_WORDS = frozenset({"yes", "yeah", "yep", "true", "correct"})
_NO_WORDS = frozenset({"no", "not", "nope", "false", "incorrect", "none", "isn't", "aren't",
                       "doesn't"})
_WORD = re.compile(r"[a-z']+")
# eval_pope.py's negative words, case-sensitive as there ("NO" and "Not" are not among them).
_POPE_NO_WORDS = frozenset({"No", "not", "no"})


def _parse_yes_no_lenient(text: str) -> str | None:
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


def parse_yes_no(text: str, *, rules: str = "official") -> str | None:
    """Read a yes/no answer as POPE's ``evaluate.py`` (= LLaVA's ``eval_pope.py``) does.

    Official: keep the text before the first ``"."``, delete commas, split on single spaces; the
    answer is ``"no"`` when a word is exactly ``No``, ``not`` or ``no``, otherwise ``"yes"`` —
    so ``""``, ``"Maybe."``, ``"There is a dog."``, ``"NO"``, ``"Nope"`` and ``"Not really."``
    are all yes. MME reads answers differently: :func:`parse_mme_answer`.

    Parameters
    ----------
    text : str
        The model's answer.
    rules : {"official", "lenient"}
        ``"lenient"``: the first word decides when it is a yes/no word (synonyms such as
        ``"Yeah"``, ``"Nope"`` included), otherwise the answer is the one kind of yes/no word the
        text contains; None when it has none or both.

    Returns
    -------
    str or None
        ``"yes"`` or ``"no"``; None only under the lenient rules.
    """
    _check_text(text)
    _check_rules(rules)
    if rules == "lenient":
        return _parse_yes_no_lenient(text)
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(word in _POPE_NO_WORDS for word in words) else "yes"


def parse_mme_answer(text: str, *, rules: str = "official") -> str | None:
    """Read a yes/no answer as MME's ``calculation.py`` does.

    Official: lower-case; ``"yes"`` or ``"no"`` as they are; otherwise the first 4 characters
    decide: ``"yes"`` inside them gives yes, else ``"no"`` inside gives no (``"Nope"``,
    ``"Not sure"``, ``"None"``), else the answer is "other" (``"Yeah"``, ``"Correct"``,
    ``"The answer is yes"``) and counts as wrong.

    Parameters
    ----------
    text : str
        The model's answer.
    rules : {"official", "lenient"}
        ``"lenient"``: :func:`parse_yes_no` with ``rules="lenient"``.

    Returns
    -------
    str or None
        ``"yes"``, ``"no"``, or None for MME's "other".
    """
    _check_text(text)
    _check_rules(rules)
    if rules == "lenient":
        return _parse_yes_no_lenient(text)
    answer = text.lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return None


def pope_split_metrics(
    predictions: Sequence[str], labels: Sequence[str], *, rules: str = "official"
) -> dict[str, float]:
    """Precision, recall, F1, accuracy and yes-ratio of one POPE split.

    "yes" is the positive class; answers are read with :func:`parse_yes_no`. Under the lenient
    rules an unparseable prediction counts as the wrong answer: a false negative when the label
    is "yes", a false positive when it is "no". Precision (recall) is 0 when nothing is
    predicted (labelled) yes, where the official script would divide by zero.

    Parameters
    ----------
    predictions : Sequence[str]
        Free-text answers, length ``N``.
    labels : Sequence[str]
        Ground truth, each ``"yes"`` or ``"no"``, length ``N``.
    rules : {"official", "lenient"}
        See :func:`parse_yes_no`.

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1``, ``accuracy``, ``yes_ratio`` (share of answers read as
        "yes"), all in percent, plus the counts ``n``, ``tp``, ``fp``, ``tn``, ``fn`` and
        ``unparseable``.
    """
    _check_rules(rules)
    _check_same_length(predictions, labels)
    tp = fp = tn = fn = unparseable = parsed_yes = 0
    for prediction, label in zip(predictions, labels, strict=True):
        if label not in ("yes", "no"):
            raise ValueError(f"POPE label must be 'yes' or 'no', got {label!r}")
        answer = parse_yes_no(prediction, rules=rules)
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
    per_split: Mapping[str, tuple[Sequence[str], Sequence[str]]], *, rules: str = "official"
) -> dict[str, Any]:
    """POPE benchmark score: the mean F1 over the random / popular / adversarial splits.

    The official script scores each split on its own; the paper (like LLaVA) reports the mean F1.

    Parameters
    ----------
    per_split : Mapping[str, tuple[Sequence[str], Sequence[str]]]
        ``split_type -> (predictions, labels)`` for split types among ``random``, ``popular``,
        ``adversarial`` (at least one).
    rules : {"official", "lenient"}
        See :func:`parse_yes_no`.

    Returns
    -------
    dict
        ``score`` (mean F1, percent), ``accuracy`` (mean accuracy, percent), ``splits`` (metrics
        of each split, :func:`pope_split_metrics`) and ``unparseable``.
    """
    _check_rules(rules)
    if not per_split:
        raise ValueError("pope_score needs at least one split, got none")
    unknown = sorted(set(per_split) - set(POPE_SPLIT_TYPES))
    if unknown:
        raise ValueError(f"unknown POPE split types {unknown}; valid: {list(POPE_SPLIT_TYPES)}")
    splits = {name: pope_split_metrics(*per_split[name], rules=rules)
              for name in POPE_SPLIT_TYPES if name in per_split}
    return {
        "score": sum(m["f1"] for m in splits.values()) / len(splits),
        "accuracy": sum(m["accuracy"] for m in splits.values()) / len(splits),
        "splits": splits,
        "unparseable": sum(m["unparseable"] for m in splits.values()),
    }


# --------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------

#: MME's subtasks as its ``calculation.py`` lists them (matched case-insensitively: ``ocr``).
MME_PERCEPTION_SUBTASKS: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "OCR",
)
MME_COGNITION_SUBTASKS: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)
_MME_PERCEPTION = frozenset(name.lower() for name in MME_PERCEPTION_SUBTASKS)
_MME_COGNITION = frozenset(name.lower() for name in MME_COGNITION_SUBTASKS)


def mme_scores(
    predictions: Sequence[str],
    labels: Sequence[str],
    subtasks: Sequence[str],
    image_ids: Sequence[str],
    *,
    rules: str = "official",
) -> dict[str, Any]:
    """MME scores: per subtask ``acc + acc+`` (each in percent, so at most 200) and the totals.

    ``acc`` is per question; ``acc+`` is per image and needs every question of the image (the
    yes/no pair) answered correctly. Answers are read with :func:`parse_mme_answer`; "other"
    (unparseable) answers are wrong.

    Parameters
    ----------
    predictions, labels, subtasks, image_ids : Sequence[str]
        Aligned sequences of length ``N``: the answer, the ``"yes"``/``"no"`` label
        (``"Yes"``/``"No"`` too under the official rules, which lower-case it), the subtask name
        and the image the question belongs to.
    rules : {"official", "lenient"}
        See :func:`parse_mme_answer`.

    Returns
    -------
    dict
        ``score`` (sum over all subtasks, the number papers report as MME), ``perception`` and
        ``cognition`` (sums over the subtasks of :data:`MME_PERCEPTION_SUBTASKS` /
        :data:`MME_COGNITION_SUBTASKS` present), ``unclassified_subtasks`` (names in neither
        list, counted in ``score`` only), ``subtasks`` (``{name: {"acc", "acc_plus", "score",
        "n_questions", "n_images"}}``) and ``unparseable``.
    """
    _check_rules(rules)
    _check_same_length(predictions, labels, subtasks, image_ids)
    question_correct: dict[str, list[bool]] = defaultdict(list)
    image_correct: dict[str, dict[str, bool]] = defaultdict(dict)
    unparseable = 0
    for prediction, label, subtask, image in zip(
        predictions, labels, subtasks, image_ids, strict=True
    ):
        if rules == "official" and isinstance(label, str):
            label = label.lower()
        if label not in ("yes", "no"):
            raise ValueError(f"MME label must be 'yes' or 'no', got {label!r}")
        answer = parse_mme_answer(prediction, rules=rules)
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
        "perception": sum(s["score"] for name, s in per_subtask.items()
                          if name.lower() in _MME_PERCEPTION),
        "cognition": sum(s["score"] for name, s in per_subtask.items()
                         if name.lower() in _MME_COGNITION),
        "unclassified_subtasks": [name for name in per_subtask
                                  if name.lower() not in _MME_PERCEPTION | _MME_COGNITION],
        "subtasks": per_subtask,
        "unparseable": unparseable,
    }


# --------------------------------------------------------------------------------------------
# MMBench (option letters, circular evaluation)
# --------------------------------------------------------------------------------------------

_OPTION_LETTERS = "ABCDEFGHIJ"
# lmms-eval's can_infer_option looks for the letters A-E whatever the number of options.
_MMBENCH_MATCHER_LETTERS = "ABCDE"
# (prefix, suffix) around a letter token that can_infer_option tries, in its order.
_MMBENCH_LETTER_WRAPS: tuple[tuple[str, str], ...] = (
    ("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
    (":", ","), (":", "."), (":", ")"), (":", ")."),
)
_MMBENCH_API_FAILURE = "Failed to obtain answer via API"


def _letters_for(options: Sequence[str] | int) -> str:
    count = options if isinstance(options, int) else len(options)
    if not 2 <= count <= len(_OPTION_LETTERS):
        raise ValueError(f"number of options must be in [2, {len(_OPTION_LETTERS)}], got {count}")
    return _OPTION_LETTERS[:count]


def _mmbench_infer_letter(text: str) -> str | None:
    # lmms-eval's can_infer_option: exactly one bare letter token (unless "A" is there in a text
    # of more than 3 tokens, where it may be the article), else exactly one wrapped letter token.
    if _MMBENCH_API_FAILURE in text:
        return None
    tokens = [token.strip() for token in text.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + letter + suffix in tokens for letter in _MMBENCH_MATCHER_LETTERS)

    if count() == 1 and not ("A" in tokens and len(tokens) > 3):
        return next(letter for letter in _MMBENCH_MATCHER_LETTERS if letter in tokens)
    for prefix, suffix in _MMBENCH_LETTER_WRAPS:
        if count(prefix, suffix) == 1:
            return next(letter for letter in _MMBENCH_MATCHER_LETTERS
                        if prefix + letter + suffix in tokens)
    return None


def _mmbench_infer_text(text: str, options: Sequence[str], letters: str) -> str | None:
    # lmms-eval's can_infer_text: the one option whose lower-cased text is a substring.
    lowered = text.lower()
    contained = [letter for letter, option in zip(letters, options, strict=True)
                 if str(option).lower() in lowered]
    return contained[0] if len(contained) == 1 else None


def _extract_option_letter_lenient(text: str, options: Sequence[str] | int, letters: str
                                   ) -> str | None:
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


def extract_option_letter(
    text: str, options: Sequence[str] | int, *, rules: str = "official"
) -> str | None:
    """Read the chosen option letter from a free-text answer.

    Official (lmms-eval's rule-based matcher ``can_infer`` on the stripped answer): split on
    whitespace; if exactly one of the tokens ``A``..``E`` is present, that letter (unless ``A``
    is present and there are more than 3 tokens: ``"A dog is sitting"``); else the first of the
    forms ``B.``, ``B,``, ``B:``, ``B)``, ``B).``, ``(B)``, ``(B).``, ``:B``, ``:B,``, ``:B.``,
    ``:B)``, ``:B).`` for which exactly one letter appears; else, when option texts are given,
    the one option whose text (lower-cased) is a substring of the answer (lower-cased). As in
    lmms-eval, the letters A-E are read whatever the number of options (a letter beyond them is
    returned and scored wrong).

    Parameters
    ----------
    text : str
        The model's answer.
    options : Sequence[str] or int
        The option texts in the order shown (letters ``A, B, ...``), or just their number.
    rules : {"official", "lenient"}
        ``"lenient"``: a leading letter, ``"answer is B"``, a single standalone valid letter,
        then an option text equal to the answer or contained in it as whole words.

    Returns
    -------
    str or None
        The letter, or None when none can be read.
    """
    _check_text(text)
    _check_rules(rules)
    letters = _letters_for(options)
    if rules == "lenient":
        return _extract_option_letter_lenient(text, options, letters)
    stripped = text.strip()
    letter = _mmbench_infer_letter(stripped)
    if letter is None and not isinstance(options, int):
        letter = _mmbench_infer_text(stripped, options, letters)
    return letter


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
    *,
    rules: str = "official",
) -> dict[str, Any]:
    """MMBench circular accuracy: a question counts only if every rotation is answered right.

    Answers are read with :func:`extract_option_letter`; an answer no rule can read is wrong
    (lmms-eval would ask its GPT judge next; no judge is used here).

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
    rules : {"official", "lenient"}
        See :func:`extract_option_letter`.

    Returns
    -------
    dict
        ``score`` (circular accuracy, percent), ``vanilla_accuracy`` (rotation 0 only, percent),
        ``per_question_accuracy`` (all rotations pooled, percent), ``n_questions``, ``n_asked``
        and ``unparseable``.
    """
    _check_rules(rules)
    _check_same_length(predictions, answers, options, groups, rotations)
    all_right: dict[str, bool] = {}
    first_right: dict[str, bool] = {}
    unparseable = correct_asked = 0
    for prediction, answer, shown, group, rotation in zip(
        predictions, answers, options, groups, rotations, strict=True
    ):
        letter = extract_option_letter(prediction, shown, rules=rules)
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
# GQA exact match
# --------------------------------------------------------------------------------------------

_SHORT_ANSWER_PUNCTUATION = re.compile(r"[^\w\s']")


def normalize_short_answer(text: str, *, rules: str = "official") -> str:
    """Normalise a predicted short answer as LLaVA's ``convert_gqa_for_eval.py`` does.

    Official: outer whitespace stripped (LLaVA's generation strips its output), trailing periods
    removed, lower-cased: ``"The Red."`` -> ``"the red"``; articles and hyphens stay.

    Parameters
    ----------
    text : str
        An answer.
    rules : {"official", "lenient"}
        ``"lenient"``: lower-case, punctuation (hyphens too) to spaces, articles removed
        (``"The Red."`` -> ``"red"``, ``"t-shirt"`` -> ``"t shirt"``).

    Returns
    -------
    str
        Normalised answer.
    """
    _check_text(text)
    _check_rules(rules)
    if rules == "official":
        return text.strip().rstrip(".").lower()
    text = _SHORT_ANSWER_PUNCTUATION.sub(" ", text.lower())
    return " ".join(word for word in text.split() if word not in _VQA_ARTICLES)


def exact_match_accuracy(
    predictions: Sequence[str], answers: Sequence[str], *, rules: str = "official"
) -> float:
    """GQA accuracy: exact match of the normalised prediction with the answer, in percent.

    Official: :func:`normalize_short_answer` of the prediction ``==`` the answer as stored (GQA's
    ``eval.py`` compares strings as they are; its answers are lower-case).

    Parameters
    ----------
    predictions, answers : Sequence[str]
        Aligned answers and ground truth, length ``N``.
    rules : {"official", "lenient"}
        ``"lenient"``: both sides through the lenient :func:`normalize_short_answer`.

    Returns
    -------
    float
        Accuracy in ``[0, 100]``.
    """
    _check_rules(rules)
    _check_same_length(predictions, answers)
    for answer in answers:
        _check_text(answer)
    if rules == "official":
        hits = sum(normalize_short_answer(p) == a
                   for p, a in zip(predictions, answers, strict=True))
    else:
        hits = sum(normalize_short_answer(p, rules=rules) == normalize_short_answer(a, rules=rules)
                   for p, a in zip(predictions, answers, strict=True))
    return 100.0 * hits / len(answers)


def gqa_accuracy(
    predictions: Sequence[str], answers: Sequence[str], *, rules: str = "official"
) -> float:
    """GQA accuracy as LLaVA evaluates GQA, in percent: :func:`exact_match_accuracy`.

    Parameters
    ----------
    predictions, answers : Sequence[str]
        Aligned answers and ground truth, length ``N``.
    rules : {"official", "lenient"}
        See :func:`exact_match_accuracy`.

    Returns
    -------
    float
        Accuracy in ``[0, 100]``.
    """
    return exact_match_accuracy(predictions, answers, rules=rules)


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


def _soft_accuracy_result(
    answers: Sequence[str], records: Sequence[Mapping[str, Any]], category_field: str,
    soft_accuracy: Callable[..., float], rules: str,
) -> dict[str, Any]:
    per_question = [soft_accuracy(answer, record["answers"], rules=rules)
                    for answer, record in zip(answers, records, strict=True)]
    by_category: dict[str, list[float]] = defaultdict(list)
    for score, record in zip(per_question, records, strict=True):
        by_category[str(record.get(category_field, record.get("category", "all")))].append(score)
    return {
        "score": 100.0 * sum(per_question) / len(per_question),
        "categories": {c: 100.0 * sum(v) / len(v) for c, v in sorted(by_category.items())},
    }


def score_benchmark(
    name: str,
    predictions: Mapping[str, str] | Sequence[str],
    records: Sequence[Mapping[str, Any]],
    *,
    rules: str = "official",
) -> dict[str, Any]:
    """Score predictions on the eval records of one benchmark.

    Parameters
    ----------
    name : str
        One of :data:`BENCHMARK_NAMES`: ``textvqa``, ``vqav2``, ``vizwiz`` (records with
        ``answers``, the reference list; VizWiz's per-type breakdown reads ``answer_type``),
        ``pope`` (``answer``, ``split_type``), ``mme`` (``answer``, ``subtask``, ``image``),
        ``mmbench`` (``answer`` letter, ``options``, optional ``circular_group`` and
        ``rotation``), ``gqa`` (``answer``).
    predictions : Mapping[str, str] or Sequence[str]
        ``record id -> answer text``, or answers aligned with ``records``.
    records : Sequence[Mapping[str, Any]]
        Eval records, e.g. as written by :func:`divico_testbed.data.write_benchmark_splits`.
    rules : {"official", "lenient"}
        The scoring rules (module docstring); VQAv2 uses :func:`vqa_soft_accuracy`, TextVQA and
        VizWiz :func:`textvqa_soft_accuracy`.

    Returns
    -------
    dict
        Always ``benchmark``, ``rules``, ``score`` (the paper's headline number: VQA accuracy %,
        mean POPE F1 %, MME total, MMBench circular accuracy %, GQA accuracy %) and ``n``; plus
        the benchmark-specific details of the metric function (``categories`` for the VQA-style
        benchmarks).
    """
    _check_rules(rules)
    answers = _align_predictions(predictions, records)
    if name == "textvqa":
        result = _soft_accuracy_result(answers, records, "category", textvqa_soft_accuracy, rules)
    elif name == "vqav2":
        result = _soft_accuracy_result(answers, records, "category", vqa_soft_accuracy, rules)
    elif name == "vizwiz":
        result = _soft_accuracy_result(answers, records, "answer_type", textvqa_soft_accuracy,
                                       rules)
    elif name == "pope":
        grouped: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for answer, record in zip(answers, records, strict=True):
            grouped[record["split_type"]][0].append(answer)
            grouped[record["split_type"]][1].append(record["answer"])
        result = pope_score(grouped, rules=rules)
    elif name == "mme":
        result = mme_scores(answers, [r["answer"] for r in records],
                            [r["subtask"] for r in records], [r["image"] for r in records],
                            rules=rules)
    elif name == "mmbench":
        result = mmbench_circular_accuracy(
            answers, [r["answer"] for r in records], [r["options"] for r in records],
            [r.get("circular_group", r["id"]) for r in records],
            [int(r.get("rotation", 0)) for r in records],
            rules=rules,
        )
    elif name == "gqa":
        result = {"score": exact_match_accuracy(answers, [r["answer"] for r in records],
                                                rules=rules)}
    else:
        raise ValueError(f"unknown benchmark {name!r}; valid: {list(BENCHMARK_NAMES)}")
    return {"benchmark": name, "rules": rules, "n": len(records), **result}


def _check_same_length(*sequences: Sequence[Any]) -> None:
    lengths = [len(s) for s in sequences]
    if len(set(lengths)) != 1:
        raise ValueError(f"inputs must have equal lengths, got {lengths}")
    if lengths[0] == 0:
        raise ValueError("inputs are empty; nothing to score")
