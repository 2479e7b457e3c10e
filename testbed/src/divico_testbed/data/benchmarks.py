"""Five synthetic mini-benchmarks in the styles the paper evaluates, plus LLaVA training data.

Each benchmark draws its own scenes (:mod:`divico_testbed.data.scenes`) and asks questions whose
answers follow from the scene ground truth:

=========  =================================================================  ================
name       questions                                                          records / image
=========  =================================================================  ================
vqav2      open questions on colour, shape, count, position and relation    1
           ("How many circles are there?"); 10 annotator-style reference
           answers with synonyms and number words, VQA soft accuracy
pope       "Is there a blue star in the image?"; for each of the split types  6
           random / popular / adversarial one "yes" and one "no" question
mme        a yes/no pair (one yes, one no) in subtask existence, count,       2
           position, color or OCR (round robin over images)
mmbench    4-option multiple choice; eval files hold every circular rotation  4 (1 for LLaVA)
gqa        short relational answers ("What color is the shape directly to     1
           the left of the triangle?"), exact match
caption    "Describe the image." -> full scene description (training only)    1
=========  =================================================================  ================

:func:`write_benchmark_splits` writes, under ``out_dir``::

    images/<split>/<set>/<scene seed>.png      rendered scenes
    <benchmark>/<split>.jsonl                  eval records (one JSON object per line)
    scenes/<split>.jsonl                       scene ground truth, keyed by image path
    llava_train.json, llava_validation.json    LLaVA-format conversations
    manifest.json                              format, seed, sizes, counts

Scene seeds are ``((seed * 3 + split) * 8 + slot) * 1_000_000 + index`` (``split`` the position in :data:`SPLITS`,
``slot`` the set's entry of :data:`SEED_SLOTS`; 8 slots per split), so splits and sets never share a scene and the
same ``seed`` reproduces byte-identical files. The first ``n`` images of a set do not depend on how many are drawn,
so a larger test split (:func:`sizes_for_test_groups`) starts with the same questions as a smaller one.

Sign text is drawn small (a few pixels high): it is asked only where the model can tell it from a near miss (MME's
OCR pairs and MMBench's OCR options), not as an open answer.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from divico.metrics import rotate_options
from tqdm.auto import tqdm

from divico_testbed.data.scenes import (
    COLORS,
    GRID_SIZE,
    POSITION_NAMES,
    SHAPE_PLURALS,
    SHAPES,
    Scene,
    SceneObject,
    Sign,
    generate_scene,
    object_prior,
    random_sign_text,
    render_scene,
)

__all__ = [
    "BENCHMARKS",
    "COLOR_VARIANTS",
    "DATA_FORMAT",
    "DEFAULT_TEST_GROUPS",
    "SEED_SLOTS",
    "SHAPE_VARIANTS",
    "VQAV2_CATEGORIES",
    "benchmark_data_current",
    "SPLITS",
    "TRAINING_SETS",
    "DEFAULT_SIZES",
    "SMALL_SIZES",
    "SHORT_ANSWER_HINT",
    "OPTION_HINT",
    "CAPTION_PROMPT",
    "MME_SUBTASKS",
    "MMBENCH_CATEGORIES",
    "MAX_CHOICE_ORDERS",
    "build_prompt",
    "training_target",
    "write_benchmark_splits",
    "load_eval_records",
    "load_scenes",
    "load_llava_conversations",
    "multiturn_conversation",
    "multiturn_file_name",
    "sizes_for_test_groups",
    "write_multiturn_training",
]

BENCHMARKS: tuple[str, ...] = ("vqav2", "pope", "mme", "mmbench", "gqa")
TRAINING_SETS: tuple[str, ...] = (*BENCHMARKS, "caption")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SHORT_ANSWER_HINT = "Answer the question using a single word or phrase."
#: The default model answers multiple choice with the option's text (scored by the letter it names, see
#: :func:`divico.metrics.extract_option_letter`): its 135M LLM did not learn to point at letters, even when told
#: the scene as text (docs/results.md, "Why MMBench was 0").
OPTION_HINT = "Answer with the option's text from the given choices directly."
CAPTION_PROMPT = "Describe the image."
MME_SUBTASKS: tuple[str, ...] = ("existence", "count", "position", "color", "ocr")
MMBENCH_CATEGORIES: tuple[str, ...] = ("color", "count", "position", "ocr", "shape")
POPE_SPLIT_TYPES: tuple[str, ...] = ("random", "popular", "adversarial")
_POPE_QUESTIONS_PER_IMAGE = 2 * len(POPE_SPLIT_TYPES)  # a yes and a no question per split type
VQAV2_CATEGORIES: tuple[str, ...] = ("color", "shape", "count", "position", "relation")
#: What annotators also answer for a colour or a shape (VQAv2's references vary in this way; VQA accuracy gives an
#: answer that fewer than 3 of the 10 references share less than full credit).
COLOR_VARIANTS: dict[str, tuple[str, ...]] = {
    "red": ("dark red",), "blue": ("dark blue",), "green": ("dark green",), "yellow": ("gold",),
    "black": ("dark gray",), "orange": ("dark orange",), "purple": ("violet",), "pink": ("magenta",),
}
SHAPE_VARIANTS: dict[str, tuple[str, ...]] = {
    "circle": ("round",), "square": ("box",), "triangle": (), "star": (), "diamond": ("rhombus",), "hexagon": (),
}
_OPTION_LETTERS = "ABCD"
#: Most option orders a multiple-choice question can be asked in: the 24 orders of 4 options, less the 3 cyclic
#: shifts of the original that re-asking never uses.
MAX_CHOICE_ORDERS = 21

#: Scoring groups per benchmark in the default test split (a question; an MMBench circular group; an MME image pair).
DEFAULT_TEST_GROUPS = 400


def sizes_for_test_groups(groups: int) -> dict[str, int]:
    """Images per set of a test split with about ``groups`` scoring groups per benchmark.

    One question per image for vqav2 and gqa, one circular group (4 records) for mmbench, one yes/no pair for mme,
    six questions (one scoring group each) for pope, so pope gets ``ceil(groups / 6)`` images.

    Raises
    ------
    ValueError
        If ``groups`` is not an int >= 1.
    """
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"test groups must be an int >= 1, got {groups!r}")
    pope_images = math.ceil(groups / _POPE_QUESTIONS_PER_IMAGE)
    return {"vqav2": groups, "pope": pope_images, "mme": groups, "mmbench": groups, "gqa": groups, "caption": 0}


# Number of IMAGES per split and set (records per image: see the module docstring). The defaults give ~4,100
# training conversations and DEFAULT_TEST_GROUPS scoring groups per benchmark in the test split.
DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "train": {"vqav2": 800, "pope": 134, "mme": 300, "mmbench": 700, "gqa": 700,
              "caption": 500},
    "validation": {"vqav2": 100, "pope": 17, "mme": 30, "mmbench": 50, "gqa": 100,
                   "caption": 50},
    "test": sizes_for_test_groups(DEFAULT_TEST_GROUPS),
}
SMALL_SIZES: dict[str, dict[str, int]] = {
    "train": {"vqav2": 6, "pope": 2, "mme": 5, "mmbench": 5, "gqa": 6, "caption": 4},
    "validation": {"vqav2": 3, "pope": 1, "mme": 5, "mmbench": 2, "gqa": 3, "caption": 2},
    "test": {"vqav2": 5, "pope": 2, "mme": 5, "mmbench": 3, "gqa": 5, "caption": 0},
}
#: Version of what the generator draws; a folder written by another version is regenerated by its users
#: (2: objects 0.20-0.26 of the image side, was 0.10-0.14; 3: the VQAv2-like set replaces the TextVQA-like one,
#: test splits of DEFAULT_TEST_GROUPS scoring groups).
DATA_FORMAT = 3
_SCENES_PER_SET_LIMIT = 1_000_000
_MAX_SCENE_ATTEMPTS = 1000
# Scene options per set: text questions need signs, the others see a mix.
_SCENE_OPTIONS: dict[str, dict[str, Any]] = {
    "vqav2": {"min_objects": 3, "sign_count_weights": (0.6, 0.3, 0.1)},
    "pope": {"sign_count_weights": (0.6, 0.3, 0.1)},
    "mme": {"sign_count_weights": (0.4, 0.4, 0.2)},
    "mmbench": {"sign_count_weights": (0.4, 0.4, 0.2)},
    "gqa": {"min_objects": 3, "sign_count_weights": (0.6, 0.3, 0.1)},
    "caption": {},
}

Question = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Helpers over scenes
# --------------------------------------------------------------------------------------------


def _number_word(n: int) -> str:
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    return words[n]


def _unique_by_shape(scene: Scene) -> list[SceneObject]:
    return [o for o in scene.objects if scene.count(shape=o.shape) == 1]


def _unique_by_name(scene: Scene) -> list[SceneObject]:
    return [o for o in scene.objects if scene.count(shape=o.shape, color=o.color) == 1]


def _distractor_text(text: str, rng: random.Random, avoid: Sequence[str]) -> str:
    """A sign text that differs from ``text`` (often by one character, the hard case)."""
    while True:
        if rng.random() < 0.6:
            index = rng.randrange(len(text))
            letter = rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ")
            candidate = text[:index] + letter + text[index + 1:]
        else:
            candidate = random_sign_text(rng)
        if candidate != text and candidate not in avoid:
            return candidate


def _yes_no_pair(yes_question: str, no_question: str) -> list[Question]:
    return [{"question": yes_question, "answer": "yes"}, {"question": no_question, "answer": "no"}]


# --------------------------------------------------------------------------------------------
# Question makers: (scene, rng, image_index) -> questions, or None when the scene does not fit
# --------------------------------------------------------------------------------------------


def _annotator_answers(canonical: str, variants: Sequence[str], rng: random.Random) -> list[str]:
    """Ten reference answers as VQAv2's annotators give them: ``canonical`` 5-8 times, the rest drawn from
    ``variants`` (synonyms, number words, answers with the noun), in random order.

    Five or more canonical answers keep the canonical answer at VQA accuracy 100 whichever variants are drawn.
    """
    canonical_count = rng.randint(5, 8)
    others = [rng.choice(variants) if variants else canonical for _ in range(10 - canonical_count)]
    answers = [canonical] * canonical_count + others
    rng.shuffle(answers)
    return answers


def _where(position: str) -> str:
    """``"at the top left of the image"``: a grid position as a phrase that picks out a cell."""
    return f"at the {position} of the image"


def _position_variants(position: str) -> tuple[str, ...]:
    """What annotators also write for a grid position (``"upper left"``, ``"top left corner"``, ``"middle"``)."""
    if position == "center":
        return ("middle", "in the middle", "in the center")
    if " " in position:  # a corner
        row, col = position.split(" ")
        return (f"upper {col}" if row == "top" else f"lower {col}", f"{position} corner", f"in the {position}")
    if position in ("top", "bottom"):
        return (f"{position} middle", f"{position} center", f"at the {position}")
    return (f"middle {position}", f"{position} side", f"on the {position}")


def _count_answers(count: int, noun_singular: str, noun_plural: str, rng: random.Random) -> list[str]:
    """References for a count: digits, number words and the count with its noun (``"2"``, ``"two"``, ``"2 circles"``)."""
    noun = noun_singular if count == 1 else noun_plural
    variants = [_number_word(count), f"{count} {noun}"]
    if count == 0:
        variants += ["none", f"no {noun_plural}"]
    return _annotator_answers(str(count), variants, rng)


def _vqav2_color(scene: Scene, rng: random.Random) -> Question | None:
    obj = rng.choice(scene.objects)
    if scene.count(shape=obj.shape) == 1 and rng.random() < 0.5:
        question = f"What color is the {obj.shape}?"
    else:  # the cell picks the object out; the question then also needs its position
        question = f"What color is the {obj.shape} {_where(obj.position)}?"
    variants = [*COLOR_VARIANTS[obj.color], f"{obj.color} {obj.shape}"]
    return {"question": question, "answer": obj.color, "answers": _annotator_answers(obj.color, variants, rng)}


def _vqav2_shape(scene: Scene, rng: random.Random) -> Question | None:
    obj = rng.choice(scene.objects)
    if scene.count(color=obj.color) == 1 and rng.random() < 0.5:
        question = f"What shape is the {obj.color} object?"
    else:
        question = f"What shape is {_where(obj.position)}?"
    variants = [*SHAPE_VARIANTS[obj.shape], f"{obj.color} {obj.shape}", f"{obj.shape} shape"]
    return {"question": question, "answer": obj.shape, "answers": _annotator_answers(obj.shape, variants, rng)}


def _vqav2_count(scene: Scene, rng: random.Random) -> Question | None:
    form = rng.choice(("shape", "color", "all"))
    if form == "shape":
        # Mostly shapes that are present; sometimes an absent one (answer 0).
        shape = rng.choice([o.shape for o in scene.objects] + [rng.choice(SHAPES)])
        count, question = scene.count(shape=shape), f"How many {SHAPE_PLURALS[shape]} are there?"
        answers = _count_answers(count, shape, SHAPE_PLURALS[shape], rng)
    elif form == "color":
        color = rng.choice([o.color for o in scene.objects])
        count, question = scene.count(color=color), f"How many {color} shapes are there?"
        answers = _count_answers(count, f"{color} shape", f"{color} shapes", rng)
    else:
        count, question = len(scene.objects), "How many shapes are there?"
        answers = _count_answers(count, "shape", "shapes", rng)
    return {"question": question, "answer": str(count), "answers": answers}


def _vqav2_position(scene: Scene, rng: random.Random) -> Question | None:
    unique = _unique_by_name(scene)
    if not unique:
        return None
    obj = rng.choice(unique)
    name = obj.shape if scene.count(shape=obj.shape) == 1 and rng.random() < 0.5 else obj.name
    return {"question": f"Where is the {name}?", "answer": obj.position,
            "answers": _annotator_answers(obj.position, _position_variants(obj.position), rng)}


def _nearest_item(scene: Scene, row: int, col: int, d_row: int, d_col: int) -> SceneObject | Sign | None:
    """The first object or sign met walking from cell (row, col) in direction (d_row, d_col), if any."""
    items: dict[tuple[int, int], SceneObject | Sign] = {(o.row, o.col): o for o in scene.objects}
    items.update({(s.row, s.col): s for s in scene.signs})
    row, col = row + d_row, col + d_col
    while 0 <= row < GRID_SIZE and 0 <= col < GRID_SIZE:
        if (row, col) in items:
            return items[(row, col)]
        row, col = row + d_row, col + d_col
    return None


_RELATION_DIRECTIONS: tuple[tuple[str, int, int], ...] = (
    ("directly to the left of", 0, -1), ("directly to the right of", 0, 1),
    ("directly above", -1, 0), ("directly below", 1, 0),
)


def _vqav2_relation(scene: Scene, rng: random.Random) -> Question | None:
    candidates = []
    for target in _unique_by_name(scene):
        for phrase, d_row, d_col in _RELATION_DIRECTIONS:
            neighbour = _nearest_item(scene, target.row, target.col, d_row, d_col)
            # Only shapes answer: what a sign is called is not what this set asks.
            if isinstance(neighbour, SceneObject):
                candidates.append((f"What is {phrase} the {target.name}?", neighbour))
    if not candidates:
        return None
    question, neighbour = rng.choice(candidates)
    variants = [neighbour.shape, f"{neighbour.name} shape", *(f"{neighbour.color} {synonym}"
                                                               for synonym in SHAPE_VARIANTS[neighbour.shape])]
    return {"question": question, "answer": neighbour.name,
            "answers": _annotator_answers(neighbour.name, variants, rng)}


_VQAV2_MAKERS: dict[str, Callable[[Scene, random.Random], Question | None]] = {
    "color": _vqav2_color, "shape": _vqav2_shape, "count": _vqav2_count, "position": _vqav2_position,
    "relation": _vqav2_relation,
}


def _vqav2_questions(scene: Scene, rng: random.Random, index: int) -> list[Question] | None:
    """One open question of category ``VQAV2_CATEGORIES[index % 5]`` (round robin, so categories stay balanced)."""
    category = VQAV2_CATEGORIES[index % len(VQAV2_CATEGORIES)]
    question = _VQAV2_MAKERS[category](scene, rng)
    return None if question is None else [{**question, "category": category}]


def _pope_questions(scene: Scene, rng: random.Random, index: int) -> list[Question] | None:
    present = sorted({(o.color, o.shape) for o in scene.objects})
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    present_shapes = {s for _, s in present}
    present_colors = {c for c, _ in present}
    by_popularity = sorted(absent, key=lambda cs: (-object_prior(*cs), cs))
    same_shape = [cs for cs in absent if cs[1] in present_shapes]
    same_color = [cs for cs in absent if cs[0] in present_colors]
    negatives = {
        "random": rng.choice(absent),
        # POPE "popular": among the most frequent objects of the dataset that are absent here.
        "popular": rng.choice(by_popularity[:3]),
        # POPE "adversarial": objects that co-occur with what is shown; here a shown shape in
        # another colour (or a shown colour on another shape).
        "adversarial": rng.choice(same_shape or same_color),
    }
    questions = []
    for split_type in POPE_SPLIT_TYPES:
        positive = rng.choice(present)
        negative = negatives[split_type]
        for question in _yes_no_pair(f"Is there a {positive[0]} {positive[1]} in the image?",
                                     f"Is there a {negative[0]} {negative[1]} in the image?"):
            question["split_type"] = split_type
            question["category"] = split_type
            questions.append(question)
    return questions


def _count_question(count: int, shape: str) -> str:
    noun = shape if count == 1 else SHAPE_PLURALS[shape]
    verb = "Is there" if count == 1 else "Are there"
    return f"{verb} exactly {_number_word(count)} {noun} in this image?"


def _mme_questions(scene: Scene, rng: random.Random, index: int) -> list[Question] | None:
    subtask = MME_SUBTASKS[index % len(MME_SUBTASKS)]
    pair: list[Question] | None = None
    if subtask == "existence":
        present = sorted({o.shape for o in scene.objects})
        absent = [s for s in SHAPES if s not in present]
        if absent:
            pair = _yes_no_pair(f"Is there a {rng.choice(present)} in this image?",
                                f"Is there a {rng.choice(absent)} in this image?")
    elif subtask == "count":
        shape = rng.choice([o.shape for o in scene.objects])
        count = scene.count(shape=shape)
        wrong = count + 1 if count == 1 or rng.random() < 0.5 else count - 1
        pair = _yes_no_pair(_count_question(count, shape), _count_question(wrong, shape))
    elif subtask == "position":
        candidates = [o for o in _unique_by_name(scene) if (o.row, o.col) != (1, 1)]
        if candidates:
            obj = rng.choice(candidates)
            if obj.col != 1:
                side, other = ("left", "right") if obj.col == 0 else ("right", "left")
                template = "Is the {name} on the {side} side of this image?"
            else:
                side, other = ("top", "bottom") if obj.row == 0 else ("bottom", "top")
                template = "Is the {name} in the {side} part of this image?"
            pair = _yes_no_pair(template.format(name=obj.name, side=side),
                                template.format(name=obj.name, side=other))
    elif subtask == "color":
        unique = _unique_by_shape(scene)
        if unique:
            obj = rng.choice(unique)
            wrong_color = rng.choice([c for c in COLORS if c != obj.color])
            pair = _yes_no_pair(f"Is the {obj.shape} in this image {obj.color}?",
                                f"Is the {obj.shape} in this image {wrong_color}?")
    elif subtask == "ocr" and scene.signs:
        sign = rng.choice(scene.signs)
        texts = [s.text for s in scene.signs]
        wrong_text = _distractor_text(sign.text, rng, texts)
        pair = _yes_no_pair(f'Is the word "{sign.text}" written in this image?',
                            f'Is the word "{wrong_text}" written in this image?')
    if pair is None:
        return None
    for question in pair:
        question["question"] += " Please answer yes or no."
        question["subtask"] = subtask
        question["category"] = subtask
    return pair


def _mmbench_questions(scene: Scene, rng: random.Random, index: int) -> list[Question] | None:
    category = MMBENCH_CATEGORIES[index % len(MMBENCH_CATEGORIES)]
    correct: str
    wrong: list[str]
    if category == "color":
        unique = _unique_by_shape(scene)
        if not unique:
            return None
        obj = rng.choice(unique)
        question, correct = f"What color is the {obj.shape}?", obj.color
        wrong = rng.sample([c for c in COLORS if c != obj.color], 3)
    elif category == "count":
        shape = rng.choice([o.shape for o in scene.objects])
        count = scene.count(shape=shape)
        question, correct = f"How many {SHAPE_PLURALS[shape]} are in the image?", str(count)
        nearby = [n for n in range(max(0, count - 3), count + 4) if n != count]
        wrong = [str(n) for n in rng.sample(nearby, 3)]
    elif category == "position":
        unique = _unique_by_name(scene)
        if not unique:
            return None
        obj = rng.choice(unique)
        question = f"Where is the {obj.name} in the image?"
        correct = obj.position
        wrong = rng.sample([p for p in POSITION_NAMES if p != correct], 3)
    elif category == "ocr":
        if not scene.signs:
            return None
        sign = rng.choice(scene.signs)
        question = ("What text is shown on the sign?" if len(scene.signs) == 1
                    else f"What text is shown on the {sign.color} sign?")
        correct = sign.text
        wrong = []
        while len(wrong) < 3:
            wrong.append(_distractor_text(sign.text, rng, [correct, *wrong]))
    else:  # "shape": the colour must pick out one object
        unique = [o for o in scene.objects if scene.count(color=o.color) == 1]
        if not unique:
            return None
        obj = rng.choice(unique)
        question, correct = f"What is the shape of the {obj.color} object?", obj.shape
        wrong = rng.sample([s for s in SHAPES if s != obj.shape], 3)
    options = [correct, *wrong]
    rng.shuffle(options)
    return [{"question": question, "options": options,
             "answer": _OPTION_LETTERS[options.index(correct)], "category": category}]


def _gqa_candidates(scene: Scene) -> dict[str, list[tuple[str, str]]]:
    candidates: dict[str, list[tuple[str, str]]] = {
        "relation_color": [], "relation_shape": [], "left_right": [], "above_below": []}
    for target in _unique_by_shape(scene):
        for direction, step in (("left", -1), ("right", 1)):
            # "directly to the left" = the same row; asked only when one shape qualifies.
            row_mates = [o for o in scene.objects
                         if o.row == target.row and (o.col - target.col) * step > 0]
            if len(row_mates) == 1:
                candidates["relation_color"].append((
                    f"What color is the shape directly to the {direction} of the "
                    f"{target.shape}?", row_mates[0].color))
    unique_names = _unique_by_name(scene)
    for target in unique_names:
        for direction, step in (("above", -1), ("below", 1)):
            column_mates = [o for o in scene.objects
                            if o.col == target.col and (o.row - target.row) * step > 0]
            if len(column_mates) == 1:
                candidates["relation_shape"].append((
                    f"What shape is directly {direction} the {target.name}?",
                    column_mates[0].shape))
    for first in unique_names:
        for second in unique_names:
            if first is second:
                continue
            if first.col != second.col:
                candidates["left_right"].append((
                    f"Is the {first.name} to the left or to the right of the {second.name}?",
                    "left" if first.col < second.col else "right"))
            if first.row != second.row:
                candidates["above_below"].append((
                    f"Is the {first.name} above or below the {second.name}?",
                    "above" if first.row < second.row else "below"))
    return {category: found for category, found in candidates.items() if found}


def _gqa_questions(scene: Scene, rng: random.Random, index: int) -> list[Question] | None:
    candidates = _gqa_candidates(scene)
    if not candidates:
        return None
    category = rng.choice(sorted(candidates))
    question, answer = rng.choice(candidates[category])
    return [{"question": question, "answer": answer, "category": category}]


def _caption_questions(scene: Scene, rng: random.Random, index: int) -> list[Question] | None:
    return [{"question": CAPTION_PROMPT, "answer": scene.describe(), "category": "caption"}]


_QUESTION_MAKERS: dict[str, Callable[[Scene, random.Random, int], list[Question] | None]] = {
    "vqav2": _vqav2_questions,
    "pope": _pope_questions,
    "mme": _mme_questions,
    "mmbench": _mmbench_questions,
    "gqa": _gqa_questions,
    "caption": _caption_questions,
}


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def build_prompt(record: Mapping[str, Any]) -> str:
    """The user text to send with the image for one record (no ``<image>`` placeholder).

    Multiple choice gets ``"A. ..."`` option lines and :data:`OPTION_HINT` (LLaVA-1.5's hint, asking for
    the option's text instead of its letter); captions get
    ``"Describe the image."``; all other questions get LLaVA-1.5's short-answer hint.

    Parameters
    ----------
    record : Mapping[str, Any]
        An eval record (needs ``benchmark`` and ``question``; ``options`` for mmbench).

    Returns
    -------
    str
        The prompt text.
    """
    missing = [key for key in ("benchmark", "question") if key not in record]
    if missing:
        raise ValueError(f"record lacks {missing}; got keys {sorted(record)}")
    benchmark = record["benchmark"]
    if benchmark == "caption":
        return CAPTION_PROMPT
    if benchmark == "mmbench":
        options = record.get("options")
        if not options:
            raise ValueError(f"mmbench record {record.get('id')!r} has no options")
        lines = [f"{_OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options)]
        return "\n".join([record["question"], *lines, OPTION_HINT])
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; valid: {list(TRAINING_SETS)}")
    return f"{record['question']}\n{SHORT_ANSWER_HINT}"


def training_target(record: Mapping[str, Any]) -> str:
    """The assistant answer used to train on ``record``.

    The text of the correct option for multiple choice (see :data:`OPTION_HINT`); the answer otherwise (for vqav2
    the canonical answer, which most of its 10 references give, as VQAv2's ``multiple_choice_answer``).
    """
    if "options" in record:
        return str(record["options"][_OPTION_LETTERS.index(record["answer"])])
    return str(record["answer"])


# --------------------------------------------------------------------------------------------
# Writing and loading
# --------------------------------------------------------------------------------------------


#: Scene-seed slot of each set within a split (the seed layout of the module docstring). Slot 0 held the scenes of the
#: TextVQA-like set (data formats 1-2) and slot 6 those of a removed sign-reading experiment (docs/benchmarks.md,
#: *Reading sign text*): both stay unused, so that no set ever draws the scenes of a data folder written before.
SEED_SLOTS: dict[str, int] = {"pope": 1, "mme": 2, "mmbench": 3, "gqa": 4, "caption": 5, "vqav2": 7}
_SEED_SLOTS_PER_SPLIT = 8


def _scene_seed(seed: int, split: str, set_name: str, index: int) -> int:
    if index >= _SCENES_PER_SET_LIMIT:
        raise ValueError(
            f"scene index {index} of {split}/{set_name} exceeds {_SCENES_PER_SET_LIMIT - 1}")
    split_index = SPLITS.index(split)
    return ((seed * len(SPLITS) + split_index) * _SEED_SLOTS_PER_SPLIT + SEED_SLOTS[set_name]) \
        * _SCENES_PER_SET_LIMIT + index


def _resolve_sizes(sizes: Mapping[str, Mapping[str, int]] | None) -> dict[str, dict[str, int]]:
    resolved = {split: dict(DEFAULT_SIZES[split]) for split in SPLITS}
    for split, per_set in (sizes or {}).items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} in sizes; valid: {list(SPLITS)}")
        for set_name, count in per_set.items():
            if set_name not in TRAINING_SETS:
                raise ValueError(
                    f"unknown set {set_name!r} in sizes[{split!r}]; valid: {list(TRAINING_SETS)}")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError(
                    f"sizes[{split!r}][{set_name!r}] must be an int >= 0, got {count!r}")
            resolved[split][set_name] = count
    return resolved


def _expand_circular(record: dict[str, Any]) -> list[dict[str, Any]]:
    """All rotations of a multiple-choice record (MMBench circular evaluation)."""
    expanded = []
    for shift in range(len(record["options"])):
        options, answer = rotate_options(record["options"], record["answer"], shift)
        expanded.append({**record, "id": f"{record['id']}-r{shift}", "options": options,
                         "answer": answer, "circular_group": record["id"], "rotation": shift})
    return expanded


def _build_set(
    set_name: str, split: str, n_images: int, seed: int, image_size: int, out_dir: Path,
    progress: tqdm,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    make_questions = _QUESTION_MAKERS[set_name]
    records: list[dict[str, Any]] = []
    scenes: list[dict[str, Any]] = []
    image_dir = out_dir / "images" / split / set_name
    image_dir.mkdir(parents=True, exist_ok=True)
    scene_index = 0
    for image_index in range(n_images):
        for _attempt in range(_MAX_SCENE_ATTEMPTS):
            scene_seed = _scene_seed(seed, split, set_name, scene_index)
            scene_index += 1
            scene = generate_scene(scene_seed, **_SCENE_OPTIONS[set_name])
            # A string seed is hashed with SHA-512 by `random`, stable across processes.
            questions = make_questions(scene, random.Random(f"questions-{scene_seed}"),
                                       image_index)
            if questions:
                break
        else:
            raise RuntimeError(
                f"no scene out of {_MAX_SCENE_ATTEMPTS} suits {set_name} question {image_index}")
        image_path = f"images/{split}/{set_name}/{scene_seed}.png"
        render_scene(scene, image_size).save(out_dir / image_path, format="PNG")
        scenes.append({"image": image_path, "scene": scene.to_dict()})
        for question_index, question in enumerate(questions):
            record = {
                "id": f"{set_name}-{split}-{image_index:05d}-{question_index}",
                "benchmark": set_name,
                "split": split,
                "image": image_path,
                "scene_seed": scene_seed,
                **question,
            }
            records.extend(_expand_circular(record) if set_name == "mmbench" else [record])
        progress.update(1)
    return records, scenes


# Calls of each question maker per scene when pooling multi-turn questions: the round-robin makers
# (vqav2, mme, mmbench) once per category/subtask, the random ones a few times for variety.
_MULTITURN_CALLS: dict[str, int] = {"vqav2": len(VQAV2_CATEGORIES), "pope": 1, "mme": len(MME_SUBTASKS),
                                    "mmbench": len(MMBENCH_CATEGORIES), "gqa": 3}


def _check_turns(turns: int) -> None:
    if not isinstance(turns, int) or isinstance(turns, bool) or turns < 1:
        raise ValueError(f"turns must be an int >= 1, got {turns!r}")


def _conversation(records: list[dict[str, Any]], image_path: str, conversation_id: str) -> dict[str, Any]:
    """A LLaVA conversation asking ``records`` in order; the first human turn holds ``<image>``."""
    conversations: list[dict[str, str]] = []
    for turn_index, record in enumerate(records):
        prefix = "<image>\n" if turn_index == 0 else ""
        conversations.append({"from": "human", "value": prefix + build_prompt(record)})
        conversations.append({"from": "gpt", "value": training_target(record)})
    return {"id": conversation_id, "image": image_path, "conversations": conversations}


def multiturn_conversation(
    scene: Scene, image_path: str, rng: random.Random, turns: int = 8, caption_share: float = 0.25,
    conversation_id: str = "multiturn", choice_orders: int = 1,
) -> dict[str, Any]:
    """One LLaVA conversation asking ``turns`` questions of every benchmark style about one image.

    Questions are pooled from every benchmark's question maker, de-duplicated, and taken round-robin
    over the benchmarks in random order, so each style appears once before any appears twice (the
    image's visual tokens are paid for once and supervise many answers). With probability
    ``caption_share`` the description of the image is asked first. With ``choice_orders > 1`` every
    multiple-choice question is asked again, later in the conversation, with its options in
    ``choice_orders - 1`` other random orders (extra turns): the same content behind different letters,
    with the same answer (the option's text).

    Parameters
    ----------
    scene : Scene
        Ground truth of the image.
    image_path : str
        Image path stored in the conversation.
    rng : random.Random
        Source of every random choice.
    turns : int
        Question turns (>= 1), not counting the optional caption turn.
    caption_share : float
        Probability in [0, 1] of a leading "Describe the image." turn.
    conversation_id : str
        The ``id`` of the conversation.
    choice_orders : int
        Option orders (1 to :data:`MAX_CHOICE_ORDERS`) in which each multiple-choice question is asked; 1: once.

    Returns
    -------
    dict
        ``{"id", "image", "conversations"}`` in LLaVA format; the first human turn holds ``<image>``.
    """
    _check_turns(turns)
    if not 0.0 <= caption_share <= 1.0:
        raise ValueError(f"caption_share must be in [0, 1], got {caption_share!r}")
    if (not isinstance(choice_orders, int) or isinstance(choice_orders, bool)
            or not 1 <= choice_orders <= MAX_CHOICE_ORDERS):
        raise ValueError(f"choice_orders must be an int in [1, {MAX_CHOICE_ORDERS}], got {choice_orders!r}")
    pools: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for set_name in BENCHMARKS:
        pool: list[dict[str, Any]] = []
        for index in range(_MULTITURN_CALLS[set_name]):
            for question in _QUESTION_MAKERS[set_name](scene, rng, index) or []:
                record = {"benchmark": set_name, **question}
                prompt = build_prompt(record)
                if prompt not in seen:
                    seen.add(prompt)
                    pool.append(record)
        rng.shuffle(pool)
        if pool:
            pools[set_name] = pool
    order = sorted(pools)
    rng.shuffle(order)
    chosen: list[dict[str, Any]] = []
    while len(chosen) < turns and any(pools.values()):
        for set_name in order:
            if pools[set_name] and len(chosen) < turns:
                chosen.append(pools[set_name].pop())
    if choice_orders > 1:
        chosen = _with_reordered_choices(chosen, choice_orders, rng)
    if rng.random() < caption_share:
        chosen.insert(0, {"benchmark": "caption", "question": CAPTION_PROMPT, "answer": scene.describe()})
    return _conversation(chosen, image_path, conversation_id)


def _with_reordered_choices(
    chosen: list[dict[str, Any]], orders: int, rng: random.Random,
) -> list[dict[str, Any]]:
    """``chosen`` plus ``orders - 1`` re-ordered copies of each multiple-choice question, each inserted at a
    random place after its original (never a cyclic shift of it, so "next letter" is no shortcut)."""
    result = list(chosen)
    for record in chosen:
        if "options" not in record:
            continue
        original = record["options"]
        correct = training_target(record)
        seen = {tuple(original[shift:] + original[:shift]) for shift in range(len(original))}
        for _ in range(orders - 1):
            options = list(original)
            while tuple(options) in seen:
                rng.shuffle(options)
            seen.add(tuple(options))
            copy = {**record, "options": options, "answer": _OPTION_LETTERS[options.index(correct)]}
            after = result.index(record)
            result.insert(rng.randint(after + 1, len(result)), copy)
    return result


def multiturn_file_name(turns: int, choice_orders: int = 1, split: str = "train") -> str:
    """File name of a multi-turn training file (``llava_train_multiturn8.json``; ``..._orders3`` when re-ordered)."""
    suffix = f"_orders{choice_orders}" if choice_orders > 1 else ""
    return f"llava_{split}_multiturn{turns}{suffix}.json"


def write_multiturn_training(
    data_dir: str | Path, seed: int = 0, turns: int = 8, caption_share: float = 0.25, split: str = "train",
    choice_orders: int = 1,
) -> Path:
    """Write :func:`multiturn_file_name`: one multi-turn conversation per image of ``split``.

    Uses the scenes already rendered by :func:`write_benchmark_splits` (``scenes/<split>.jsonl``), so
    no image is drawn twice and held-out test images are never touched.

    Returns
    -------
    Path
        The written file.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"multi-turn files exist for 'train' and 'validation', got {split!r}")
    root = Path(data_dir)
    rows = _read_jsonl(root / "scenes" / f"{split}.jsonl")
    conversations = []
    for index, row in enumerate(rows):
        rng = random.Random(f"multiturn-{seed}-{split}-{row['image']}")
        conversations.append(multiturn_conversation(
            Scene.from_dict(row["scene"]), row["image"], rng, turns=turns, caption_share=caption_share,
            conversation_id=f"multiturn-{split}-{index:05d}", choice_orders=choice_orders))
    random.Random(f"multiturn-order-{seed}-{split}").shuffle(conversations)
    path = root / multiturn_file_name(turns, choice_orders, split)
    _write_json(path, conversations)
    return path


def _llava_conversation(record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": record["id"],
        "image": record["image"],
        "conversations": [
            {"from": "human", "value": "<image>\n" + build_prompt(record)},
            {"from": "gpt", "value": training_target(record)},
        ],
    }


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_json(path: Path, data: Any) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, ensure_ascii=False, indent=1)
        handle.write("\n")


def write_benchmark_splits(
    out_dir: str | Path,
    seed: int = 0,
    sizes: Mapping[str, Mapping[str, int]] | None = None,
    image_size: int = 168,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Generate every benchmark split, the LLaVA training files and the scene ground truth.

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created; existing files of the same names are overwritten).
    seed : int
        Non-negative base seed; equal seeds give byte-identical files.
    sizes : Mapping[str, Mapping[str, int]], optional
        Number of images per ``split -> set`` (sets: the benchmarks and ``caption``), overriding
        :data:`DEFAULT_SIZES` entry by entry; :data:`SMALL_SIZES` is a tiny preset.
    image_size : int
        Side of the square images in pixels (>= 64).
    show_progress : bool
        Show a tqdm bar over images.

    Returns
    -------
    dict
        The manifest also written to ``out_dir/manifest.json``: ``format`` (:data:`DATA_FORMAT`), ``seed``, ``image_size``,
        ``sizes`` and ``counts`` (records per ``split -> set``, conversations per LLaVA file).
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(image_size, int) or image_size < 64:
        raise ValueError(f"image_size must be an int >= 64, got {image_size!r}")
    resolved = _resolve_sizes(sizes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Any] = {}
    total_images = sum(sum(per_set.values()) for per_set in resolved.values())
    with tqdm(total=total_images, desc="rendering scenes", unit="img",
              disable=not show_progress) as progress:
        for split in SPLITS:
            split_scenes: list[dict[str, Any]] = []
            conversations: list[dict[str, Any]] = []
            counts[split] = {}
            for set_name in TRAINING_SETS:
                records, scenes = _build_set(set_name, split, resolved[split][set_name], seed,
                                             image_size, out, progress)
                split_scenes += scenes
                counts[split][set_name] = len(records)
                if set_name in BENCHMARKS:
                    _write_jsonl(out / set_name / f"{split}.jsonl", records)
                # Training sees each multiple-choice question once, in its generated order.
                conversations += [_llava_conversation(r) for r in records
                                  if r.get("rotation", 0) == 0]
            _write_jsonl(out / "scenes" / f"{split}.jsonl", split_scenes)
            if split != "test":
                random.Random(f"llava-{seed}-{split}").shuffle(conversations)
                _write_json(out / f"llava_{split}.json", conversations)
                counts[f"llava_{split}"] = len(conversations)
    manifest = {"format": DATA_FORMAT, "seed": seed, "image_size": image_size, "sizes": resolved,
                "counts": counts}
    _write_json(out / "manifest.json", manifest)
    return manifest


def benchmark_data_current(data_dir: str | Path, sizes: Mapping[str, Mapping[str, int]] | None = None) -> bool:
    """True when ``data_dir`` holds a complete :func:`write_benchmark_splits` output of this :data:`DATA_FORMAT`
    (and, with ``sizes``, of those sizes, resolved as :func:`write_benchmark_splits` resolves them).

    The manifest is written last, so a folder without one is an interrupted write; a folder from an older
    generator would evaluate a model on scenes other than the ones it was trained on.
    """
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    if manifest.get("format") != DATA_FORMAT:
        return False
    return sizes is None or manifest.get("sizes") == _resolve_sizes(sizes)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_eval_records(data_dir: str | Path, benchmark: str, split: str) -> list[dict[str, Any]]:
    """Eval records of one benchmark split written by :func:`write_benchmark_splits`.

    Parameters
    ----------
    data_dir : str or Path
        The ``out_dir`` given to :func:`write_benchmark_splits`.
    benchmark : str
        One of :data:`BENCHMARKS`.
    split : str
        One of :data:`SPLITS`.

    Returns
    -------
    list[dict]
        Records in file order; ``image`` paths are relative to ``data_dir``.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; valid: {list(BENCHMARKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    path = Path(data_dir) / benchmark / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"no eval file {path}; generate it with `divico make-data --out {data_dir}`")
    return _read_jsonl(path)


def load_scenes(data_dir: str | Path, split: str) -> dict[str, Scene]:
    """Scene ground truth of one split, keyed by image path (relative to ``data_dir``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    path = Path(data_dir) / "scenes" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no scene file {path}")
    return {row["image"]: Scene.from_dict(row["scene"]) for row in _read_jsonl(path)}


def load_llava_conversations(data_dir: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """LLaVA-format conversations (``train`` or ``validation``) written by this module."""
    if split not in ("train", "validation"):
        raise ValueError(f"LLaVA files exist for 'train' and 'validation', got {split!r}")
    path = Path(data_dir) / f"llava_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no LLaVA file {path}")
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)
