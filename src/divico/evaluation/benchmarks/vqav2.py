"""VQAv2: val from the official release (scored here), test-dev from LLaVA's layout (submission file).

Files (``playground/data/eval/vqav2``)::

    vqav2/v2_OpenEnded_mscoco_val2014_questions.json   official: {"questions": [{"question_id", "image_id",
    vqav2/v2_mscoco_val2014_annotations.json            "question"}]} + {"annotations": [{"question_id",
    vqav2/val2014/COCO_val2014_<image_id:012d>.jpg       "answers": [{"answer", ...} x10], "answer_type"}]}
    vqav2/llava_vqav2_mscoco_test-dev2015.jsonl         LLaVA's test-dev questions {"question_id", "image", "text"}
      (or the official v2_OpenEnded_mscoco_test-dev2015_questions.json)
    vqav2/llava_vqav2_mscoco_test2015.jsonl             optional: every test2015 id, for a complete submission
    vqav2/test2015/                                     the test images

``split`` None picks val when its two files are present, else test-dev. Scoring (val) is what LLaVA's submission
and the EvalAI server do together, and lmms-eval's VQAv2 task: the prediction through the EvalAI answer processor,
then ``vqaEval.py``'s soft accuracy.
"""

from __future__ import annotations

import json
from collections import defaultdict
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
from divico.metrics import normalize_evalai_answer, vqa_soft_accuracy

__all__ = ["VQAv2", "vqa_server_accuracy"]


def vqa_server_accuracy(prediction: str, references: Sequence[str], rules: str = "official") -> float:
    """Soft accuracy of one answer as LLaVA's submission + the VQA server (and lmms-eval) compute it, in [0, 1].

    Official: ``vqaEval.py`` on the EvalAI-processed prediction; lenient: :mod:`divico.metrics`' lenient VQA rule.
    """
    if rules == "lenient":
        return vqa_soft_accuracy(prediction, references, rules="lenient")
    return vqa_soft_accuracy(normalize_evalai_answer(prediction), references, rules="vqaeval")


def require_ten_answers(record: Mapping[str, Any], path: Path, where: str) -> list[str]:
    """The ``answers[*].answer`` strings of a VQAv2 / VizWiz annotation record, checked (at least 2; 10 released).

    Raises
    ------
    BenchmarkDataError
        An answer without a string ``answer``, or fewer than 2 answers.
    """
    for number, answer in enumerate(record["answers"]):
        require_fields(answer, {"answer": str}, path, f"{where}.answers[{number}]")
    if len(record["answers"]) < 2:
        raise BenchmarkDataError(f"{path}, {where}: expected 10 answers, got {len(record['answers'])}.")
    return [answer["answer"] for answer in record["answers"]]


def vqa_benchmark_scores(answers: Sequence[str], samples: Sequence[Sample], rules: str) -> dict[str, Any]:
    """VQA accuracy as the evaluation server computes it (%), overall and per ``meta["answer_type"]``."""
    scores = [vqa_server_accuracy(answer, sample.reference, rules) for answer, sample in zip(answers, samples,
                                                                                            strict=True)]
    return {"score": 100.0 * sum(scores) / len(scores),
            "answer_types": questions_by_type(scores, [s.meta["answer_type"] for s in samples]),
            "n": len(samples)}


def questions_by_type(scores: Sequence[float], types: Sequence[str]) -> dict[str, float]:
    """Mean score in percent per answer type."""
    grouped: dict[str, list[float]] = defaultdict(list)
    for score, kind in zip(scores, types, strict=True):
        grouped[kind].append(score)
    return {kind: 100.0 * sum(values) / len(values) for kind, values in sorted(grouped.items())}


@register_benchmark("vqav2")
class VQAv2(Benchmark):
    """VQAv2 ``val`` (answers public) or ``test-dev`` (submission to the EvalAI server).

    ``score`` (val) returns ``score`` (accuracy %), ``answer_types`` (accuracy % per yes/no, number, other) and
    ``n``; test-dev: ``score`` None and a note.
    """

    folder = "vqav2"
    splits = ("val", "test-dev")
    default_split = None
    default_max_new_tokens = 128  # model_vqa_loader.py's default

    def __init__(self, data_root: Path | str, split: str | None = None, **options: Any) -> None:
        super().__init__(data_root, split, **options)
        if self.split is None:
            val = self._files("val")
            self.split = "val" if val["questions"].exists() and val["annotations"].exists() else "test-dev"
        self.has_public_answers = self.split == "val"

    def _files(self, split: str) -> dict[str, Path]:
        if split == "val":
            return {"questions": self.root / "v2_OpenEnded_mscoco_val2014_questions.json",
                    "annotations": self.root / "v2_mscoco_val2014_annotations.json",
                    "images": self.root / "val2014"}
        llava = self.root / "llava_vqav2_mscoco_test-dev2015.jsonl"
        official = self.root / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
        return {"questions": llava if llava.exists() or not official.exists() else official,
                "all_test_questions": self.root / "llava_vqav2_mscoco_test2015.jsonl",
                "images": self.root / "test2015"}

    def files(self) -> dict[str, Path]:
        return self._files(self.split)

    def load(self) -> list[Sample]:
        files = self.files()
        if self.split == "val":
            return self._load_val(files)
        if files["questions"].suffix == ".jsonl":
            return self._load_llava(files["questions"], files["images"])
        return self._load_official(files["questions"], files["images"], "test2015", None)

    def _load_llava(self, path: Path, images: Path) -> list[Sample]:
        samples = []
        for line, record in read_jsonl(path, "LLaVA's VQAv2 questions {question_id, image, text}"):
            require_fields(record, {"question_id": int, "image": str, "text": str}, path, f"line {line}")
            image = require_image(images / record["image"], path, f"line {line}")
            samples.append(Sample(question_id=str(record["question_id"]), prompt=record["text"], images=(image,)))
        return samples

    def _load_official(self, path: Path, images: Path, image_split: str,
                       annotations: dict[int, dict[str, Any]] | None) -> list[Sample]:
        release = read_json(path, "VQAv2's questions: {'questions': [{question_id, image_id, question}]}")
        if not isinstance(release, dict) or "questions" not in release:
            raise BenchmarkDataError(f"{path}: expected an object with a 'questions' list (VQAv2 release).")
        samples = []
        for index, record in iter_records(release["questions"], path, "questions"):
            where = f"questions[{index}]"
            require_fields(record, {"question_id": int, "image_id": int, "question": str}, path, where)
            image = require_image(images / f"COCO_{image_split}_{record['image_id']:012d}.jpg", path, where)
            reference, meta = None, {"image_id": record["image_id"]}
            if annotations is not None:
                annotation = annotations.get(record["question_id"])
                if annotation is None:
                    raise BenchmarkDataError(f"{path}, {where}: question_id {record['question_id']} has no "
                                             f"annotation in {self.files()['annotations']}.")
                reference = [answer["answer"] for answer in annotation["answers"]]
                meta["answer_type"] = annotation.get("answer_type", "all")
            samples.append(Sample(question_id=str(record["question_id"]),
                                  prompt=f"{record['question']}\n{SHORT_ANSWER_INSTRUCTION}", images=(image,),
                                  reference=reference, meta=meta))
        return samples

    def _load_val(self, files: dict[str, Path]) -> list[Sample]:
        path = files["annotations"]
        release = read_json(path, "VQAv2's annotations: {'annotations': [{question_id, answers: [{answer}]}]}")
        if not isinstance(release, dict) or "annotations" not in release:
            raise BenchmarkDataError(f"{path}: expected an object with an 'annotations' list (VQAv2 release).")
        annotations = {}
        for index, record in iter_records(release["annotations"], path, "annotations"):
            where = f"annotations[{index}]"
            require_fields(record, {"question_id": int, "answers": list}, path, where)
            require_ten_answers(record, path, where)
            annotations[record["question_id"]] = record
        return self._load_official(files["questions"], files["images"], "val2014", annotations)

    def score(self, predictions: Mapping[str, str], samples: Sequence[Sample], *,
              judge: Any = None) -> dict[str, Any]:
        if not self.has_public_answers:
            return self.no_public_answers(samples)
        return vqa_benchmark_scores(self.require_predictions(predictions, samples), samples, self.options["rules"])

    def write_submission(self, predictions: Mapping[str, str], samples: Sequence[Sample],
                         path: Path) -> Path | None:
        """test-dev: the server's JSON ``[{"question_id": int, "answer": str}]``, answers through the EvalAI answer
        processor, as LLaVA's ``convert_vqav2_for_submission.py``; every test2015 question when
        ``llava_vqav2_mscoco_test2015.jsonl`` is present (unanswered ones as ``""``, which the server requires),
        else the samples. None for val."""
        if self.has_public_answers:
            return None
        all_questions = self.files()["all_test_questions"]
        if all_questions.exists():
            ids = []
            for line, record in read_jsonl(all_questions, "LLaVA's VQAv2 test2015 questions {question_id, ...}"):
                require_fields(record, {"question_id": int}, all_questions, f"line {line}")
                ids.append(record["question_id"])
        else:
            ids = [int(sample.question_id) for sample in samples]
        entries = [{"question_id": question_id,
                    "answer": normalize_evalai_answer(predictions[str(question_id)])
                    if str(question_id) in predictions else ""} for question_id in ids]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entries), encoding="utf-8")
        return path
