"""MME (14 yes/no subtasks), read from the official release folder and scored as its ``calculation.py``.

Files (LLaVA-1.5's ``playground/data/eval/MME``)::

    MME/MME_Benchmark_release_version/<subtask>/<image>.{jpg,png} + <image>.txt
    MME/MME_Benchmark_release_version/<subtask>/images/<image>.* + questions_answers_YN/<image>.txt
                                        (artwork, celebrity, landmark, posters, scene)

Each ``.txt`` holds the image's questions, one ``<question>\\t<Yes|No>`` per line (two per image). The prompt is
the question as released (it ends in "Please answer yes or no.") plus LLaVA-1.5's short-answer instruction on a
new line, as in LLaVA's ``llava_mme.jsonl`` and lmms-eval's MME task. ``question_id`` is
``"<subtask>/<image file>:<line>"`` (LLaVA's id is ``"<subtask>/<image file>"``, shared by the image's questions).
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
    register_benchmark,
)
from divico.metrics import MME_COGNITION_SUBTASKS, MME_PERCEPTION_SUBTASKS, mme_scores

__all__ = ["MME", "MME_SUBTASKS"]

MME_SUBTASKS: tuple[str, ...] = MME_PERCEPTION_SUBTASKS + MME_COGNITION_SUBTASKS
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


@register_benchmark("mme")
class MME(Benchmark):
    """MME: every subtask folder of the release present is read.

    ``score`` returns ``score`` (perception + cognition total, the number the paper reports), ``perception``,
    ``cognition``, ``subtasks`` (per subtask ``acc``, ``acc_plus`` (%), ``score`` = acc + acc+), ``unparseable``
    and ``n``.
    """

    folder = "MME"
    default_max_new_tokens = 128  # model_vqa_loader.py's default

    def release_folder(self) -> Path:
        """``MME/MME_Benchmark_release_version``, or the data root itself when it is that folder."""
        nested = self.root / "MME_Benchmark_release_version"
        if nested.is_dir():
            return nested
        own = self.data_root
        if own.name == "MME_Benchmark_release_version" or any((own / name).is_dir() for name in MME_SUBTASKS):
            return own
        return nested

    def files(self) -> dict[str, Path]:
        return {"release": self.release_folder()}

    def load(self) -> list[Sample]:
        release = self.release_folder()
        present = [name for name in MME_SUBTASKS if (release / name).is_dir()]
        if not present:
            raise BenchmarkDataError(f"Missing MME release folder {release}: expected subtask folders "
                                     f"({', '.join(MME_SUBTASKS)}) from MME_Benchmark_release_version.")
        samples = []
        for subtask in present:
            folder = release / subtask
            if (folder / "images").is_dir():
                image_folder, question_folder = folder / "images", folder / "questions_answers_YN"
                if not question_folder.is_dir():
                    raise BenchmarkDataError(f"Missing folder {question_folder}: {subtask} has an images/ folder, "
                                             f"so its question files are expected in questions_answers_YN/.")
            else:
                image_folder = question_folder = folder
            question_files = sorted(question_folder.glob("*.txt"))
            if not question_files:
                raise BenchmarkDataError(f"{question_folder}: no question files (<image>.txt with "
                                         f"'<question>\\t<Yes|No>' lines) for subtask {subtask}.")
            for question_file in question_files:
                image = self._image_for(question_file, image_folder)
                samples += self._questions(question_file, subtask, image)
        return samples

    @staticmethod
    def _image_for(question_file: Path, image_folder: Path) -> Path:
        for extension in IMAGE_EXTENSIONS:
            candidate = image_folder / (question_file.stem + extension)
            if candidate.is_file():
                return candidate
        raise BenchmarkDataError(f"{question_file}: no image {question_file.stem}.jpg/.png in {image_folder}.")

    @staticmethod
    def _questions(question_file: Path, subtask: str, image: Path) -> list[Sample]:
        samples = []
        for number, line in enumerate(question_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.strip().split("\t")
            if len(fields) != 2 or fields[1] not in ("Yes", "No"):
                raise BenchmarkDataError(f"{question_file}, line {number}: expected '<question>\\t<Yes|No>', got "
                                         f"{line!r}.")
            question, answer = fields
            image_id = f"{subtask}/{image.name}"
            samples.append(Sample(question_id=f"{image_id}:{number}",
                                  prompt=f"{question.strip()}\n{SHORT_ANSWER_INSTRUCTION}", images=(image,),
                                  reference=answer, meta={"subtask": subtask, "image_id": image_id,
                                                          "question": question}))
        return samples

    def score(self, predictions: Mapping[str, str], samples: Sequence[Sample], *,
              judge: Any = None) -> dict[str, Any]:
        answers = self.require_predictions(predictions, samples)
        result = mme_scores(answers, [s.reference for s in samples], [s.meta["subtask"] for s in samples],
                            [s.meta["image_id"] for s in samples], rules=self.options["rules"])
        return {**result, "n": len(samples)}
