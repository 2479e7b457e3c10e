"""VizWiz-VQA: val from the official release (scored here), test as LLaVA-1.5 runs it (submission file).

Files (``playground/data/eval/vizwiz``)::

    vizwiz/val.json          official: [{"image", "question", "answers": [{"answer", "answer_confidence"} x10],
    vizwiz/val/                         "answer_type", "answerable"}] + the val images
    vizwiz/llava_test.jsonl  LLaVA's test questions {"question_id", "image", "text"} (or the official test.json:
    vizwiz/test/                        [{"image", "question"}]) + the test images

Prompt (LLaVA-1.5): ``<question>\\nWhen the provided information is insufficient, respond with 'Unanswerable'.\\n
Answer the question using a single word or phrase.`` ``split`` None picks val when ``val.json`` is present, else
test. Val is scored like VQAv2 (the VizWiz evaluation is the VQA one): EvalAI-processed prediction, ``vqaEval.py``
soft accuracy; ``question_id`` is the image file name (one question per image), LLaVA's id where it has one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from divico.evaluation.benchmark import (
    SHORT_ANSWER_INSTRUCTION,
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
from divico.evaluation.benchmarks.vqav2 import require_ten_answers, vqa_benchmark_scores
from divico.metrics import normalize_evalai_answer

__all__ = ["UNANSWERABLE_INSTRUCTION", "VizWiz"]

UNANSWERABLE_INSTRUCTION = "When the provided information is insufficient, respond with 'Unanswerable'."


@register_benchmark("vizwiz")
class VizWiz(Benchmark):
    """VizWiz ``val`` (answers public) or ``test`` (submission to the EvalAI server).

    ``score`` (val) returns ``score`` (accuracy %), ``answer_types`` (accuracy % per yes/no, number, other,
    unanswerable) and ``n``.
    """

    folder = "vizwiz"
    splits = ("val", "test")
    default_split = None
    default_max_new_tokens = 128  # model_vqa_loader.py's default

    def __init__(self, data_root: Path | str, split: str | None = None, **options: Any) -> None:
        super().__init__(data_root, split, **options)
        if self.split is None:
            self.split = "val" if (self.root / "val.json").exists() else "test"
        self.has_public_answers = self.split == "val"

    def files(self) -> dict[str, Path]:
        if self.split == "val":
            return {"questions": self.root / "val.json", "images": self.root / "val"}
        llava = self.root / "llava_test.jsonl"
        official = self.root / "test.json"
        return {"questions": llava if llava.exists() or not official.exists() else official,
                "images": self.root / "test"}

    @staticmethod
    def prompt(question: str) -> str:
        """LLaVA-1.5's VizWiz prompt for ``question``."""
        return f"{question}\n{UNANSWERABLE_INSTRUCTION}\n{SHORT_ANSWER_INSTRUCTION}"

    def load(self) -> list[Sample]:
        files = self.files()
        path = files["questions"]
        if path.suffix == ".jsonl":
            samples = []
            for line, record in read_jsonl(path, "LLaVA's VizWiz questions {question_id, image, text}"):
                require_fields(record, {"question_id": (int, str), "image": str, "text": str}, path, f"line {line}")
                image = require_image(files["images"] / record["image"], path, f"line {line}")
                samples.append(Sample(question_id=str(record["question_id"]), prompt=record["text"], images=(image,),
                                      meta={"image": record["image"]}))
            return samples
        fields: dict[str, type | tuple[type, ...]] = {"image": str, "question": str}
        if self.has_public_answers:
            fields["answers"] = list
        samples, seen = [], set()
        for index, record in iter_records(read_json(path, "VizWiz's annotations: a list of {image, question, "
                                                          "answers}"), path, "VizWiz questions"):
            name = record.get("image") if isinstance(record, dict) else None
            where = f"record {index} ({name})" if isinstance(name, str) else f"record {index}"
            require_fields(record, fields, path, where)
            if record["image"] in seen:
                raise BenchmarkDataError(f"{path}, {where}: image {record['image']!r} appears twice.")
            seen.add(record["image"])
            reference, meta = None, {"image": record["image"]}
            if self.has_public_answers:
                reference = require_ten_answers(record, path, where)
                meta["answer_type"] = record.get("answer_type", "all")
            image = require_image(files["images"] / record["image"], path, where)
            samples.append(Sample(question_id=record["image"], prompt=self.prompt(record["question"]),
                                  images=(image,), reference=reference, meta=meta))
        return samples

    def score(self, predictions: Mapping[str, str], samples: Sequence[Sample], *,
              judge: Any = None) -> dict[str, Any]:
        if not self.has_public_answers:
            return self.no_public_answers(samples)
        return vqa_benchmark_scores(self.require_predictions(predictions, samples), samples, self.options["rules"])

    def write_submission(self, predictions: Mapping[str, str], samples: Sequence[Sample],
                         path: Path) -> Path | None:
        """test: the server's JSON ``[{"image": str, "answer": str}]``, answers through the EvalAI answer processor
        as LLaVA's ``convert_vizwiz_for_submission.py``, for the answered samples in order. None for val."""
        if self.has_public_answers:
            return None
        entries = [{"image": sample.meta["image"], "answer": normalize_evalai_answer(predictions[sample.question_id])}
                   for sample in samples if sample.question_id in predictions]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entries), encoding="utf-8")
        return path
