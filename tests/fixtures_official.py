"""Tiny image benchmarks in their official / LLaVA-1.5 file formats, for tests.

``write_benchmark_fixture(name, root)`` writes benchmark ``name``'s files under ``root`` in LLaVA-1.5's
``playground/data/eval`` layout (``root/textvqa/...``, ``root/MME/MME_Benchmark_release_version/...``), every split
the loader knows (VQAv2 val + test-dev, VizWiz val + test, MMBench dev + test), with 2-6 questions and small
generated PNG/JPEG images; ``write_all_fixtures(root)`` writes every one. ``FIXTURE_BENCHMARKS`` lists the names.
The records are module constants so that tests can state expected values by hand; ``FIXTURE_QUESTION_COUNTS``
gives the number of samples each benchmark's default split loads.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."

FIXTURE_BENCHMARKS: tuple[str, ...] = ("gqa", "mmbench", "mme", "pope", "scienceqa", "textvqa", "vizwiz", "vqav2")
IMAGE_SIZE = 48


def make_image(seed: int) -> Image.Image:
    """A small RGB image, different for every ``seed``: a coloured square on a coloured ground."""
    ground = ((seed * 97) % 256, (seed * 57 + 80) % 256, (seed * 31 + 160) % 256)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), ground)
    offset = 4 + seed % 16
    ImageDraw.Draw(image).rectangle((offset, offset, offset + 20, offset + 20), fill=(255 - ground[0], 40, 200))
    return image


def save_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(seed).save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return path


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# -- TextVQA -----------------------------------------------------------------------------------------------------

TEXTVQA_RELEASE = [
    {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?",
     "answers": ["nikon"] * 7 + ["nikon camera"] * 2 + ["canon"]},
    {"question_id": 34603, "image_id": "003a8ae2ef43b901", "question": "How many lenses are shown?",
     "answers": ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]},
    {"question_id": 34700, "image_id": "00a1b2c3d4e5f607", "question": "is this a sign?", "answers": ["no"] * 10},
]
# LLaVA's jsonl: question_id is the image id; OCR tokens on the second line where there are any.
TEXTVQA_LLAVA = [
    {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg",
     "text": f"what is the brand of this camera?\nReference OCR token: dakota, digital, nikon\n{SHORT}"},
    {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg",
     "text": f"How many lenses are shown?\nReference OCR token: 2, lenses\n{SHORT}"},
    {"question_id": "00a1b2c3d4e5f607", "image": "00a1b2c3d4e5f607.jpg", "text": f"is this a sign?\n{SHORT}"},
]


def write_textvqa(root: Path) -> None:
    folder = root / "textvqa"
    write_json(folder / "TextVQA_0.5.1_val.json",
               {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                "data": [{**record, "image_classes": ["Camera"], "set_name": "val"} for record in TEXTVQA_RELEASE]})
    write_jsonl(folder / "llava_textvqa_val_v051_ocr.jsonl", TEXTVQA_LLAVA)
    for seed, record in enumerate({r["image"]: r for r in TEXTVQA_LLAVA}.values()):
        save_image(folder / "train_images" / record["image"], seed)


# -- POPE --------------------------------------------------------------------------------------------------------

POPE_RELEASE = {
    "adversarial": [("COCO_val2014_000000310196.jpg", "Is there a dining table in the image?", "no"),
                    ("COCO_val2014_000000429109.jpg", "Is there a snowboard in the image?", "yes")],
    "popular": [("COCO_val2014_000000210789.jpg", "Is there a person in the image?", "yes"),
                ("COCO_val2014_000000210789.jpg", "Is there a car in the image?", "no")],
    "random": [("COCO_val2014_000000016631.jpg", "Is there a bird in the image?", "yes"),
               ("COCO_val2014_000000016631.jpg", "Is there a knife in the image?", "no")],
}


def pope_llava_questions() -> list[dict[str, Any]]:
    """LLaVA's llava_pope_test.jsonl for the fixture: ids 1..6, categories in file order adversarial, popular,
    random, the question plus the short-answer instruction."""
    records, question_id = [], 1
    for category, questions in POPE_RELEASE.items():
        for image, text, _ in questions:
            records.append({"question_id": question_id, "image": image, "text": f"{text}\n{SHORT}",
                            "category": category})
            question_id += 1
    return records


def write_pope(root: Path) -> None:
    folder = root / "pope"
    for category, questions in POPE_RELEASE.items():
        write_jsonl(folder / "coco" / f"coco_pope_{category}.json",
                    [{"question_id": number, "image": image, "text": text, "label": label}
                     for number, (image, text, label) in enumerate(questions, start=1)])
    write_jsonl(folder / "llava_pope_test.jsonl", pope_llava_questions())
    images = sorted({image for questions in POPE_RELEASE.values() for image, _, _ in questions})
    for seed, image in enumerate(images):
        save_image(folder / "val2014" / image, seed + 10)


# -- MME ---------------------------------------------------------------------------------------------------------

# subtask -> (nested images/ + questions_answers_YN/?, {image file: [(question, answer), ...]})
MME_RELEASE: dict[str, tuple[bool, dict[str, list[tuple[str, str]]]]] = {
    "existence": (False, {
        "000000006040.jpg": [("Is there a train in this image? Please answer yes or no.", "Yes"),
                             ("Is there a bed in this image? Please answer yes or no.", "No")],
        "000000044279.jpg": [("Is there a cat in this image? Please answer yes or no.", "Yes"),
                             ("Is there a dog in this image? Please answer yes or no.", "No")],
    }),
    "artwork": (True, {
        "10002.jpg": [("Is this artwork created by Donatello? Please answer yes or no.", "Yes"),
                      ("Is this artwork created by Monet? Please answer yes or no.", "No")],
    }),
    "code_reasoning": (False, {
        "0020.png": [("Is a python code shown in the picture? Please answer yes or no.", "No"),
                     ("Is a c++ code shown in the picture? Please answer yes or no.", "Yes")],
    }),
}


def write_mme(root: Path) -> None:
    release = root / "MME" / "MME_Benchmark_release_version"
    seed = 20
    for subtask, (nested, images) in MME_RELEASE.items():
        image_folder = release / subtask / "images" if nested else release / subtask
        question_folder = release / subtask / "questions_answers_YN" if nested else release / subtask
        for image, questions in images.items():
            save_image(image_folder / image, seed)
            seed += 1
            question_folder.mkdir(parents=True, exist_ok=True)
            (question_folder / (Path(image).stem + ".txt")).write_text(
                "".join(f"{question}\t{answer}\n" for question, answer in questions), encoding="utf-8")


# -- MMBench -----------------------------------------------------------------------------------------------------

MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split")
# (index, question, hint, options, answer, category, l2-category); circular copies written out by hand, as in
# mmbench_dev_20230712.tsv (index + k * 1e6, options shifted left by k, the answer letter moved with them).
MMBENCH_DEV = [
    (0, "What animal is shown?", None, ["cat", "dog"], "A", "attribute_recognition", "finegrained_perception"),
    (1000000, "What animal is shown?", None, ["dog", "cat"], "B", "attribute_recognition", "finegrained_perception"),
    (1, "Which season is it?", "The photo was taken outdoors.", ["spring", "summer", "autumn", "winter"], "D",
     "scene", "coarse_perception"),
    (1000001, "Which season is it?", "The photo was taken outdoors.", ["summer", "autumn", "winter", "spring"], "C",
     "scene", "coarse_perception"),
    (2000001, "Which season is it?", "The photo was taken outdoors.", ["autumn", "winter", "spring", "summer"], "B",
     "scene", "coarse_perception"),
    (3000001, "Which season is it?", "The photo was taken outdoors.", ["winter", "spring", "summer", "autumn"], "A",
     "scene", "coarse_perception"),
]
MMBENCH_TEST = [
    (5, "What colour is the square?", None, ["red", "blue", "green"], None, "color", "attribute"),
    (6, "How many squares are there?", "Count carefully.", ["1", "2"], None, "count", "attribute"),
]


def mmbench_image_base64(seed: int) -> str:
    buffer = io.BytesIO()
    make_image(seed).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_mmbench_tsv(path: Path, rows: Sequence[tuple], *, with_answers: bool = True,
                      image_references: bool = True) -> Path:
    """An MMBench TSV of ``rows``; with ``image_references`` a circular copy's image is the main row's index
    (as in VLMEvalKit's TSVs), else its own base64 copy."""
    columns = [c for c in MMBENCH_COLUMNS if with_answers or c != "answer"]
    lines = ["\t".join(columns)]
    for index, question, hint, options, answer, category, l2 in rows:
        group = index % 1_000_000
        image = str(group) if image_references and index >= 1_000_000 else mmbench_image_base64(30 + group)
        values = {"index": str(index), "question": question, "hint": hint or "nan",
                  **{letter: (options[i] if i < len(options) else "") for i, letter in enumerate("ABCD")},
                  "answer": answer or "", "category": category, "image": image, "source": "fixture",
                  "l2-category": l2, "comment": "", "split": "dev" if with_answers else "test"}
        lines.append("\t".join(values[c] for c in columns))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_mmbench(root: Path) -> None:
    folder = root / "mmbench"
    write_mmbench_tsv(folder / "mmbench_dev_20230712.tsv", MMBENCH_DEV)
    write_mmbench_tsv(folder / "mmbench_test_20230712.tsv", MMBENCH_TEST, with_answers=False)


# -- VQAv2 -------------------------------------------------------------------------------------------------------

VQAV2_VAL = [
    # (question_id, image_id, question, answers, answer_type)
    (262148000, 262148, "Is the man wearing a hat?", ["yes"] * 10, "yes/no"),
    (262148001, 262148, "How many people are there?", ["2", "2"] + ["3"] * 8, "number"),
    (393225000, 393225, "What color is the bowl?", ["black and white"] * 4 + ["gray"] * 6, "other"),
]
VQAV2_TEST_DEV = [(4195880, 419588, "What is the dog doing?"), (4195881, 419588, "Is it sunny?")]
VQAV2_TEST_ONLY = [(5810320, 581032, "What is on the table?")]  # in test2015, not in test-dev


def write_vqav2(root: Path) -> None:
    folder = root / "vqav2"
    write_json(folder / "v2_OpenEnded_mscoco_val2014_questions.json",
               {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                "questions": [{"image_id": image, "question": q, "question_id": qid}
                              for qid, image, q, _, _ in VQAV2_VAL]})
    write_json(folder / "v2_mscoco_val2014_annotations.json",
               {"info": {}, "data_subtype": "val2014",
                "annotations": [{"question_id": qid, "image_id": image, "answer_type": kind,
                                 "question_type": "what", "multiple_choice_answer": answers[0],
                                 "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                             for i, a in enumerate(answers)]}
                                for qid, image, _, answers, kind in VQAV2_VAL]})
    for seed, image in enumerate(sorted({image for _, image, _, _, _ in VQAV2_VAL})):
        save_image(folder / "val2014" / f"COCO_val2014_{image:012d}.jpg", 40 + seed)

    def llava(records: Sequence[tuple[int, int, str]]) -> list[dict[str, Any]]:
        return [{"question_id": qid, "image": f"COCO_test2015_{image:012d}.jpg", "text": f"{q}\n{SHORT}",
                 "category": "default"} for qid, image, q in records]

    write_jsonl(folder / "llava_vqav2_mscoco_test-dev2015.jsonl", llava(VQAV2_TEST_DEV))
    write_jsonl(folder / "llava_vqav2_mscoco_test2015.jsonl", llava(VQAV2_TEST_DEV + VQAV2_TEST_ONLY))
    for seed, image in enumerate(sorted({image for _, image, _ in VQAV2_TEST_DEV + VQAV2_TEST_ONLY})):
        save_image(folder / "test2015" / f"COCO_test2015_{image:012d}.jpg", 50 + seed)


# -- VizWiz ------------------------------------------------------------------------------------------------------

VIZWIZ_VAL = [
    ("VizWiz_val_00000000.jpg", "What is this?", ["unanswerable"] * 7 + ["blurry"] * 3, "unanswerable", 0),
    ("VizWiz_val_00000001.jpg", "What drink is this?", ["coca cola"] * 5 + ["coke"] * 5, "other", 1),
    ("VizWiz_val_00000002.jpg", "Is the light on?", ["yes"] * 2 + ["no"] * 8, "yes/no", 1),
]
VIZWIZ_TEST = [("VizWiz_test_00000000.jpg", "What colour is this shirt?"),
               ("VizWiz_test_00000001.jpg", "What does this label say?")]
VIZWIZ_INSTRUCTION = "When the provided information is insufficient, respond with 'Unanswerable'."


def write_vizwiz(root: Path) -> None:
    folder = root / "vizwiz"
    write_json(folder / "val.json",
               [{"image": image, "question": question, "answerable": answerable, "answer_type": kind,
                 "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]}
                for image, question, answers, kind, answerable in VIZWIZ_VAL])
    write_jsonl(folder / "llava_test.jsonl",
                [{"question_id": number, "image": image, "text": f"{question}\n{VIZWIZ_INSTRUCTION}\n{SHORT}"}
                 for number, (image, question) in enumerate(VIZWIZ_TEST)])
    for seed, (image, *_) in enumerate(VIZWIZ_VAL):
        save_image(folder / "val" / image, 60 + seed)
    for seed, (image, _) in enumerate(VIZWIZ_TEST):
        save_image(folder / "test" / image, 70 + seed)


# -- GQA ---------------------------------------------------------------------------------------------------------

GQA_TESTDEV = {
    "20968156": ("n161313", "Is it overcast?", "yes", "verify"),
    "20968157": ("n161313", "What is the man wearing?", "t-shirt", "query"),
    "201307251": ("n235859", "Are there both cars and trucks?", "no", "logical"),
}


def write_gqa(root: Path) -> None:
    folder = root / "gqa"
    write_json(folder / "data" / "testdev_balanced_questions.json",
               {qid: {"semantic": [], "entailed": [], "equivalent": [qid], "question": question, "imageId": image,
                      "isBalanced": True, "groups": {"global": None, "local": "01-overcast"}, "answer": answer,
                      "semanticStr": "", "annotations": {}, "types": {"detailed": structural,
                                                                      "semantic": "attr",
                                                                      "structural": structural}}
                for qid, (image, question, answer, structural) in GQA_TESTDEV.items()})
    write_jsonl(folder / "llava_gqa_testdev_balanced.jsonl",
                [{"question_id": qid, "image": f"{image}.jpg", "text": f"{question}\n{SHORT}"}
                 for qid, (image, question, _, _) in GQA_TESTDEV.items()])
    for seed, image in enumerate(sorted({image for image, _, _, _ in GQA_TESTDEV.values()})):
        save_image(folder / "data" / "images" / f"{image}.jpg", 80 + seed)


# -- ScienceQA ---------------------------------------------------------------------------------------------------

# id -> (question, choices, answer index, image file or None)
SCIENCEQA_PROBLEMS = {
    "4": ("Which property do these three objects have in common?", ["shiny", "slippery", "opaque"], 1,
          "image.png"),
    "5": ("Which animal's feet are also adapted for grabbing prey?", ["tiger", "goldfish"], 0, "image.png"),
    "9": ("What is the capital of Utah?", ["Boise", "Provo", "Salt Lake City", "Denver"], 2, None),
}


def scienceqa_llava_value(question: str, choices: Sequence[str], has_image: bool) -> str:
    """The human turn as LLaVA's convert_sqa_to_llava.py writes it for the CQM-A format."""
    options = " ".join(f"({letter}) {choice}" for letter, choice in zip("ABCDE", choices))
    text = f"Context: N/A\nQuestion: {question}\nOptions: {options}"
    return f"{text}\n<image>" if has_image else text


def write_scienceqa(root: Path) -> None:
    folder = root / "scienceqa"
    write_json(folder / "problems.json",
               {pid: {"question": question, "choices": choices, "answer": answer, "hint": "", "image": image,
                      "task": "closed choice", "grade": "grade2", "subject": "natural science", "split": "test",
                      "lecture": "", "solution": ""}
                for pid, (question, choices, answer, image) in SCIENCEQA_PROBLEMS.items()})
    write_json(folder / "pid_splits.json", {"test": list(SCIENCEQA_PROBLEMS)})
    records = []
    for seed, (pid, (question, choices, answer, image)) in enumerate(SCIENCEQA_PROBLEMS.items()):
        record: dict[str, Any] = {"id": pid}
        if image is not None:
            record["image"] = f"{pid}/{image}"
            save_image(folder / "images" / "test" / pid / image, 90 + seed)
        human = scienceqa_llava_value(question, choices, image is not None)
        record["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": "ABCDE"[answer]}]
        records.append(record)
    write_json(folder / "llava_test_CQM-A.json", records)


# -- API ---------------------------------------------------------------------------------------------------------

_WRITERS = {"gqa": write_gqa, "mmbench": write_mmbench, "mme": write_mme, "pope": write_pope,
            "scienceqa": write_scienceqa, "textvqa": write_textvqa, "vizwiz": write_vizwiz, "vqav2": write_vqav2}

#: Samples each benchmark's default split loads from its fixture (VQAv2 and VizWiz default to val).
FIXTURE_QUESTION_COUNTS = {"gqa": 3, "mmbench": 6, "mme": 8, "pope": 6, "scienceqa": 3, "textvqa": 3, "vizwiz": 3,
                           "vqav2": 3}


def write_benchmark_fixture(name: str, root: Path) -> Path:
    """Write benchmark ``name``'s fixture under ``root`` (the data root) and return ``root``.

    Raises
    ------
    ValueError
        If ``name`` is not one of :data:`FIXTURE_BENCHMARKS`.
    """
    if name not in _WRITERS:
        raise ValueError(f"No fixture for benchmark {name!r}; fixtures: {', '.join(FIXTURE_BENCHMARKS)}.")
    root = Path(root)
    _WRITERS[name](root)
    return root


def write_all_fixtures(root: Path) -> Path:
    """Write every benchmark's fixture under ``root`` and return ``root``."""
    for name in FIXTURE_BENCHMARKS:
        write_benchmark_fixture(name, root)
    return Path(root)
