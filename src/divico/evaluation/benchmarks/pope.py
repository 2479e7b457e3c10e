"""POPE (COCO: adversarial, popular, random), scored as POPE's ``evaluate.py`` / LLaVA's ``eval_pope.py``.

Files (LLaVA-1.5's ``playground/data/eval/pope``)::

    pope/coco/coco_pope_{adversarial,popular,random}.json   POPE's release: one JSON object per line
                                                            {"question_id", "image", "text", "label": "yes"|"no"}
    pope/llava_pope_test.jsonl                              LLaVA's questions {"question_id", "image", "text",
                                                            "category"} (optional; from LLaVA's eval.zip)
    pope/val2014/                                           COCO val2014 images

With LLaVA's question file, its ``question_id`` and ``text`` are used and the labels are taken, as ``eval_pope.py``
does, from the split's release file in order (checked image by image). Without it, the release files are the
questions (``question_id`` ``"<split>/<id>"``) with LLaVA's short-answer instruction appended.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from divico.evaluation.benchmark import (
    SHORT_ANSWER_INSTRUCTION,
    Benchmark,
    BenchmarkDataError,
    Sample,
    read_jsonl,
    register_benchmark,
    require_fields,
    require_image,
)
from divico.metrics import POPE_SPLIT_TYPES, pope_score

__all__ = ["POPE"]

_RELEASE_FIELDS = {"question_id": (int, str), "image": str, "text": str, "label": str}


@register_benchmark("pope")
class POPE(Benchmark):
    """POPE on COCO; ``split`` None: every split whose release file is present (LLaVA scores all three).

    ``score`` returns ``score`` (mean F1 % over the splits present, the number LLaVA-1.5 and the paper report),
    ``accuracy`` (mean accuracy %), ``splits`` (per split: precision, recall, f1, accuracy, yes_ratio in %, counts)
    and ``n``.
    """

    folder = "pope"
    splits = POPE_SPLIT_TYPES
    default_split = None
    default_max_new_tokens = 128  # model_vqa_loader.py's default

    def files(self) -> dict[str, Path]:
        files = {"questions": self.root / "llava_pope_test.jsonl", "images": self.root / "val2014"}
        for split in self.splits if self.split is None else (self.split,):
            files[split] = self.root / "coco" / f"coco_pope_{split}.json"
        return files

    def load(self) -> list[Sample]:
        files = self.files()
        chosen = [split for split in self.splits if split in files and (self.split or files[split].exists())]
        if not chosen:
            raise BenchmarkDataError(f"Missing POPE release files: expected at least one of "
                                     f"{', '.join(str(files[s]) for s in self.splits)} (POPE's output/coco).")
        labels = {split: self._release(files[split]) for split in chosen}
        if not files["questions"].exists():
            return [Sample(question_id=f"{split}/{record['question_id']}",
                           prompt=f"{record['text']}\n{SHORT_ANSWER_INSTRUCTION}",
                           images=(require_image(files["images"] / record["image"], files[split], f"line {line}"),),
                           reference=record["label"], meta={"split": split, "image": record["image"]})
                    for split in chosen for line, record in labels[split]]

        question_file = files["questions"]
        by_split: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        for line, record in read_jsonl(question_file, "LLaVA's POPE questions {question_id, image, text, category}"):
            require_fields(record, {"question_id": (int, str), "image": str, "text": str, "category": str},
                           question_file, f"line {line}")
            by_split[record["category"]].append((line, record))
        samples, seen = [], set()
        for split in chosen:
            questions, release = by_split.get(split, []), labels[split]
            if len(questions) != len(release):
                raise BenchmarkDataError(f"{question_file}: {len(questions)} questions of category {split!r}, but "
                                         f"{files[split]} has {len(release)}; eval_pope.py pairs them in order.")
            for (line, record), (release_line, truth) in zip(questions, release, strict=True):
                where = f"line {line}"
                if record["image"] != truth["image"]:
                    raise BenchmarkDataError(f"{question_file}, {where}: image {record['image']!r} differs from "
                                             f"{files[split]} line {release_line} ({truth['image']!r}); the two "
                                             f"files must list the {split} questions in the same order.")
                question_id = str(record["question_id"])
                if question_id in seen:
                    raise BenchmarkDataError(f"{question_file}, {where}: question_id {question_id} appears twice.")
                seen.add(question_id)
                image = require_image(files["images"] / record["image"], question_file, where)
                samples.append(Sample(question_id=question_id, prompt=record["text"], images=(image,),
                                      reference=truth["label"], meta={"split": split, "image": record["image"]}))
        return samples

    @staticmethod
    def _release(path: Path) -> list[tuple[int, dict[str, Any]]]:
        records = read_jsonl(path, "POPE questions, one JSON object per line {question_id, image, text, label}")
        for line, record in records:
            require_fields(record, _RELEASE_FIELDS, path, f"line {line}")
            if record["label"] not in ("yes", "no"):
                raise BenchmarkDataError(f"{path}, line {line}: label should be 'yes' or 'no', got "
                                         f"{record['label']!r}.")
        return records

    def score(self, predictions: Mapping[str, str], samples: Sequence[Sample], *,
              judge: Any = None) -> dict[str, Any]:
        answers = self.require_predictions(predictions, samples)
        per_split: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for sample, answer in zip(samples, answers, strict=True):
            per_split[sample.meta["split"]][0].append(answer)
            per_split[sample.meta["split"]][1].append(sample.reference)
        return {**pope_score(per_split, rules=self.options["rules"]), "n": len(samples)}
