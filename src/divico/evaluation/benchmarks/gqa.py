"""GQA test-dev balanced, as LLaVA-1.5 evaluates it (``convert_gqa_for_eval.py`` + GQA's ``eval.py``).

Files (``playground/data/eval/gqa``)::

    gqa/data/testdev_balanced_questions.json   official: {"<question id>": {"imageId", "question", "answer",
      (or gqa/testdev_balanced_questions.json)             "types": {"structural", ...}, ...}}
    gqa/llava_gqa_testdev_balanced.jsonl       LLaVA's questions {"question_id", "image", "text"} (optional;
                                               without it the prompt is the question + LLaVA's instruction)
    gqa/data/images/<imageId>.jpg              the images

Scoring: the prediction with trailing periods removed and lower-cased, equal to the answer (``eval.py``'s
accuracy); ``open`` / ``binary`` as ``eval.py`` splits them (structural type ``query`` is open, every other
type binary).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from divico.evaluation.benchmark import (
    SHORT_ANSWER_INSTRUCTION,
    Benchmark,
    BenchmarkDataError,
    Sample,
    read_json,
    read_jsonl,
    register_benchmark,
    require_fields,
    require_image,
)
from divico.metrics import gqa_accuracy

__all__ = ["GQA"]


@register_benchmark("gqa")
class GQA(Benchmark):
    """GQA test-dev balanced.

    ``score`` returns ``score`` (accuracy %), ``binary`` and ``open`` (accuracy % of each kind, where the question
    file gives structural types) and ``n``.
    """

    folder = "gqa"
    default_max_new_tokens = 128  # model_vqa_loader.py's default

    def files(self) -> dict[str, Path]:
        nested = self.root / "data" / "testdev_balanced_questions.json"
        flat = self.root / "testdev_balanced_questions.json"
        images = self.root / "data" / "images"
        return {"annotations": nested if nested.exists() or not flat.exists() else flat,
                "questions": self.root / "llava_gqa_testdev_balanced.jsonl",
                "images": images if images.is_dir() or not (self.root / "images").is_dir() else self.root / "images"}

    def load(self) -> list[Sample]:
        files = self.files()
        path = files["annotations"]
        release = read_json(path, "GQA's questions: an object question id -> {imageId, question, answer, ...}")
        if not isinstance(release, dict):
            raise BenchmarkDataError(f"{path}: expected an object question id -> question, got "
                                     f"{type(release).__name__}.")
        for question_id, record in release.items():
            require_fields(record, {"imageId": str, "question": str, "answer": str}, path,
                           f"question {question_id!r}")
        if files["questions"].exists():
            question_file = files["questions"]
            entries = []
            for line, record in read_jsonl(question_file, "LLaVA's GQA questions {question_id, image, text}"):
                where = f"line {line}"
                require_fields(record, {"question_id": (str, int), "image": str, "text": str}, question_file, where)
                question_id = str(record["question_id"])
                if question_id not in release:
                    raise BenchmarkDataError(f"{question_file}, {where}: question_id {question_id!r} is not in "
                                             f"{path}.")
                entries.append((question_id, record["image"], record["text"], question_file, where))
        else:
            entries = [(question_id, f"{record['imageId']}.jpg", f"{record['question']}\n{SHORT_ANSWER_INSTRUCTION}",
                        path, f"question {question_id!r}") for question_id, record in release.items()]
        samples = []
        for question_id, image_name, prompt, source, where in entries:
            record = release[question_id]
            structural = (record.get("types") or {}).get("structural")
            samples.append(Sample(question_id=question_id, prompt=prompt,
                                  images=(require_image(files["images"] / image_name, source, where),),
                                  reference=record["answer"],
                                  meta={"image_id": record["imageId"],
                                        "kind": None if structural is None else
                                        ("open" if structural == "query" else "binary")}))
        return samples

    def score(self, predictions: Mapping[str, str], samples: Sequence[Sample], *,
              judge: Any = None) -> dict[str, Any]:
        answers = self.require_predictions(predictions, samples)
        rules = self.options["rules"]
        result: dict[str, Any] = {"score": gqa_accuracy(answers, [s.reference for s in samples], rules=rules)}
        for kind in ("binary", "open"):
            chosen = [i for i, sample in enumerate(samples) if sample.meta["kind"] == kind]
            if chosen:
                result[kind] = gqa_accuracy([answers[i] for i in chosen], [samples[i].reference for i in chosen],
                                            rules=rules)
        return {**result, "n": len(samples)}
