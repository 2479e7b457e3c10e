"""ScienceQA test, as LLaVA-1.5 runs it (``model_vqa_science.py --single-pred-prompt`` + ``eval_science_qa.py``).

Files (``playground/data/eval/scienceqa``)::

    scienceqa/llava_test_CQM-A.json   LLaVA's questions [{"id", "image"?, "conversations": [{"from": "human",
                                      "value": "...<image>..."}, ...]}] (LLaVA's eval.zip / convert_sqa_to_llava.py)
    scienceqa/problems.json           the release: {"<id>": {"choices": [...], "answer": <index>, ...}}
    scienceqa/images/test/<id>/image.png

The prompt is the first human turn without ``<image>``, stripped, plus LLaVA's option-letter instruction; text-only
questions have no image. The answer is read as ``eval_science_qa.py`` reads it: the whole output a letter A-E,
or ``"X. ..."``, or a single ``"The answer is X."``; anything else fails.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from divico.evaluation.benchmark import (
    OPTION_LETTER_INSTRUCTION,
    Benchmark,
    BenchmarkDataError,
    Sample,
    iter_records,
    read_json,
    register_benchmark,
    require_fields,
    require_image,
)

__all__ = ["SCIENCEQA_OPTIONS", "ScienceQA", "scienceqa_answer_letter"]

#: ``eval_science_qa.py``'s ``--options`` default.
SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_answer_letter(text: str) -> str | None:
    """The letter ``eval_science_qa.py`` reads from an answer, or None for its "FAILED".

    The whole text one of A-E; else ``"X. "`` at the start (X in A-E); else exactly one match of
    ``The answer is ([A-Z]).`` (regex as in the script, so the dot matches any character).
    """
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


@register_benchmark("scienceqa")
class ScienceQA(Benchmark):
    """ScienceQA test (all questions; those with an image form SQA-IMG).

    ``score`` returns ``score`` (accuracy % on the questions with an image, SQA-IMG, the number LLaVA-1.5
    publishes; the overall accuracy when no question has one), ``accuracy`` (all questions), ``img_accuracy``,
    ``n_img``, ``failed`` (answers no rule could read) and ``n``.
    """

    folder = "scienceqa"
    default_max_new_tokens = 1024  # model_vqa_science.py generates up to 1024 tokens

    def files(self) -> dict[str, Path]:
        return {"questions": self.root / "llava_test_CQM-A.json", "problems": self.root / "problems.json",
                "images": self.root / "images" / "test"}

    def load(self) -> list[Sample]:
        files = self.files()
        problems_path = files["problems"]
        problems = read_json(problems_path, "ScienceQA's problems: an object id -> {choices, answer, ...}")
        if not isinstance(problems, dict):
            raise BenchmarkDataError(f"{problems_path}: expected an object problem id -> problem, got "
                                     f"{type(problems).__name__}.")
        path = files["questions"]
        samples = []
        for index, record in iter_records(read_json(path, "LLaVA's ScienceQA questions [{id, image?, "
                                                          "conversations}]"), path, "questions"):
            where = f"record {index}"
            require_fields(record, {"id": (str, int), "conversations": list}, path, where)
            question_id = str(record["id"])
            where = f"record {index} (id {question_id})"
            if not record["conversations"]:
                raise BenchmarkDataError(f"{path}, {where}: conversations is empty; expected the human turn first.")
            require_fields(record["conversations"][0], {"value": str}, path, f"{where}.conversations[0]")
            problem = problems.get(question_id)
            if problem is None:
                raise BenchmarkDataError(f"{path}, {where}: id {question_id} is not in {problems_path}.")
            require_fields(problem, {"choices": list, "answer": int}, problems_path, f"problem {question_id!r}")
            if not 0 <= problem["answer"] < min(len(problem["choices"]), len(SCIENCEQA_OPTIONS)):
                raise BenchmarkDataError(f"{problems_path}, problem {question_id!r}: answer {problem['answer']} is "
                                         f"not an index of its {len(problem['choices'])} choices.")
            prompt = record["conversations"][0]["value"].replace("<image>", "").strip()
            images: tuple[Path, ...] = ()
            if "image" in record:
                require_fields(record, {"image": str}, path, where)
                images = (require_image(files["images"] / record["image"], path, where),)
            samples.append(Sample(question_id=question_id, prompt=f"{prompt}\n{OPTION_LETTER_INSTRUCTION}",
                                  images=images, reference=SCIENCEQA_OPTIONS[problem["answer"]],
                                  meta={"n_choices": len(problem["choices"]), "has_image": bool(images),
                                        "subject": problem.get("subject")}))
        return samples

    def score(self, predictions: Mapping[str, str], samples: Sequence[Sample], *,
              judge: Any = None) -> dict[str, Any]:
        answers = self.require_predictions(predictions, samples)
        letters = [scienceqa_answer_letter(answer) for answer in answers]
        # eval_science_qa.py: a letter beyond the question's choices counts as wrong (index -1).
        correct = [letter is not None and letter in SCIENCEQA_OPTIONS[: s.meta["n_choices"]] and letter == s.reference
                   for letter, s in zip(letters, samples, strict=True)]
        with_image = [hit for hit, sample in zip(correct, samples, strict=True) if sample.meta["has_image"]]
        accuracy = 100.0 * sum(correct) / len(correct)
        img_accuracy = 100.0 * sum(with_image) / len(with_image) if with_image else None
        return {"score": img_accuracy if img_accuracy is not None else accuracy, "accuracy": accuracy,
                "img_accuracy": img_accuracy, "n_img": len(with_image),
                "failed": sum(letter is None for letter in letters), "n": len(samples)}
