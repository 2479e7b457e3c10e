"""TextVQA (val), as LLaVA-1.5 evaluates it: its OCR-token prompts, scored with the EvalAI answer processor.

Files (LLaVA-1.5's ``playground/data/eval/textvqa``)::

    textvqa/llava_textvqa_val_v051_ocr.jsonl   LLaVA's questions: {"question_id": <image id>, "image": "<file>",
                                               "text": "<question>\\nReference OCR token: ...\\nAnswer the question
                                               using a single word or phrase."}  (from LLaVA's eval.zip)
    textvqa/TextVQA_0.5.1_val.json             the official release: {"data": [{"question_id", "image_id",
                                               "question", "answers": [10 strings]}, ...]}
    textvqa/train_images/                      the images

LLaVA's ``eval_textvqa.py`` matches each of its questions to the release by ``(image_id, question.lower())``, the
question read back out of the prompt; the samples here carry the release's own ``question_id``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from divico.evaluation.benchmark import (
    Benchmark,
    BenchmarkDataError,
    Sample,
    iter_records,
    read_json,
    read_jsonl,
    register_benchmark,
    require_fields,
    require_image,
)
from divico.metrics import textvqa_accuracy

__all__ = ["TextVQA", "question_from_llava_prompt"]

_OCR_TOKENS_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def question_from_llava_prompt(prompt: str) -> str | None:
    """The question inside a LLaVA TextVQA prompt, lower-cased, as ``eval_textvqa.py``'s ``prompt_processor``
    reads it; None for a prompt of none of its three forms (where LLaVA's script asserts)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OCR_TOKENS_QUESTION.search(prompt)
        question = match.group(1) if match else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = None
    return None if question is None else question.lower()


@register_benchmark("textvqa")
class TextVQA(Benchmark):
    """TextVQA val with LLaVA-1.5's OCR prompts.

    ``score`` returns ``score`` (accuracy %, LLaVA's ``TextVQAAccuracyEvaluator``: EvalAI-processed answers,
    leave-one-out ``min(1, matches / 3)``) and ``n``.
    """

    folder = "textvqa"
    default_max_new_tokens = 128  # model_vqa_loader.py's default

    def files(self) -> dict[str, Path]:
        return {"questions": self.root / "llava_textvqa_val_v051_ocr.jsonl",
                "annotations": self.root / "TextVQA_0.5.1_val.json",
                "images": self.root / "train_images"}

    def load(self) -> list[Sample]:
        files = self.files()
        annotation_file = files["annotations"]
        release = read_json(annotation_file, "TextVQA's release file: an object with a 'data' list of questions "
                                             "(question_id, image_id, question, answers)")
        if not isinstance(release, dict) or "data" not in release:
            raise BenchmarkDataError(f"{annotation_file}: expected an object with a 'data' list (TextVQA 0.5.1), "
                                     f"got {type(release).__name__} without 'data'.")
        by_key: dict[tuple[str, str], dict[str, Any]] = {}
        for index, record in iter_records(release["data"], annotation_file, "TextVQA questions"):
            require_fields(record, {"question_id": int, "image_id": str, "question": str, "answers": list},
                           annotation_file, f"data[{index}]")
            by_key[(record["image_id"], record["question"].lower())] = record

        question_file = files["questions"]
        samples, seen = [], set()
        for line, record in read_jsonl(question_file, "LLaVA's TextVQA questions {question_id, image, text} "
                                                      "(LLaVA-1.5 eval.zip)"):
            where = f"line {line}"
            require_fields(record, {"question_id": (str, int), "image": str, "text": str}, question_file, where)
            question = question_from_llava_prompt(record["text"])
            if question is None:
                raise BenchmarkDataError(f"{question_file}, {where}: text {record['text']!r} is none of LLaVA's "
                                         f"TextVQA prompt forms ('<question>\\nReference OCR token: ...\\n"
                                         f"<instruction>', 'OCR tokens: ... Question: ... Short answer:', "
                                         f"'<question>\\n<instruction>').")
            annotation = by_key.get((str(record["question_id"]), question))
            if annotation is None:
                raise BenchmarkDataError(f"{question_file}, {where}: no question with image_id "
                                         f"{record['question_id']!r} and question {question!r} in "
                                         f"{annotation_file}.")
            question_id = str(annotation["question_id"])
            if question_id in seen:
                raise BenchmarkDataError(f"{question_file}, {where}: question_id {question_id} of {annotation_file} "
                                         f"asked twice.")
            seen.add(question_id)
            image = require_image(files["images"] / record["image"], question_file, where)
            samples.append(Sample(question_id=question_id, prompt=record["text"], images=(image,),
                                  reference=[str(answer) for answer in annotation["answers"]],
                                  meta={"image_id": annotation["image_id"], "question": annotation["question"]}))
        return samples

    def score(self, predictions: Mapping[str, str], samples: Sequence[Sample], *,
              judge: Any = None) -> dict[str, Any]:
        answers = self.require_predictions(predictions, samples)
        accuracy = textvqa_accuracy(answers, [s.reference for s in samples], rules=self.options["rules"])
        return {"score": accuracy, "n": len(samples)}
